//! Builds every `kernels/*.cu` of the project as C++ with `kexec.h`, and a registration unit per
//! file listing its kernels (found in the preprocessed source by the `__attribute__((used))` that
//! `__global__` becomes).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

fn main() {
    let here = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let kernels = here
        .join("../../kernels")
        .canonicalize()
        .expect("kernels/ beside crates/");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed={}", kernels.display());
    for f in ["kexec.h", "kexec.cpp", "registry.h"] {
        println!("cargo:rerun-if-changed={}", here.join(f).display());
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&kernels)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("cu" | "cuh")))
        .collect();
    files.sort();
    // the executor's own test kernels (kernel names start with probe_)
    files.push(here.join("probe.cu"));
    println!("cargo:rerun-if-changed={}", here.join("probe.cu").display());
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .std("c++17")
            .opt_level(2)
            .include(&here)
            .include(&kernels)
            .flag_if_supported("-Wno-unused-parameter")
            .flag_if_supported("-Wno-unused-function")
            .flag_if_supported("-Wno-unused-variable")
            .warnings(false);
        b
    };
    let mut all = String::from("extern \"C\" void kexec_register_all() {\n");
    let mut units = Vec::new();
    for f in files.iter().filter(|p| p.extension().unwrap() == "cu") {
        let stem = f.file_stem().unwrap().to_str().unwrap().to_string();
        let plain = out.join(format!("{stem}_plain.cpp"));
        std::fs::write(&plain, include_line(f)).unwrap();
        let expanded = base().file(&plain).expand();
        let text = String::from_utf8_lossy(&expanded);
        let names = kernel_names(&text);
        assert!(!names.is_empty(), "{}: no kernels found", f.display());
        let mut unit = include_line(f);
        writeln!(unit, "#include \"registry.h\"").unwrap();
        writeln!(unit, "extern \"C\" void kexec_register_{stem}() {{").unwrap();
        for n in &names {
            writeln!(unit, "    kexec::add(\"{n}\", &{n});").unwrap();
        }
        unit.push_str("}\n");
        let path = out.join(format!("{stem}_unit.cpp"));
        std::fs::write(&path, unit).unwrap();
        units.push(path);
        writeln!(all, "    kexec_register_{stem}();").unwrap();
    }
    // the calls need C linkage declarations at file scope
    let decls: String = units
        .iter()
        .map(|p| {
            let stem = p
                .file_stem()
                .unwrap()
                .to_str()
                .unwrap()
                .trim_end_matches("_unit");
            format!("extern \"C\" void kexec_register_{stem}();\n")
        })
        .collect();
    let all_path = out.join("register_all.cpp");
    std::fs::write(&all_path, format!("{decls}{all}}}\n")).unwrap();
    let mut b = base();
    b.file(here.join("kexec.cpp")).file(&all_path);
    for u in &units {
        b.file(u);
    }
    b.compile("kexec");
}

fn include_line(f: &Path) -> String {
    format!("#include \"kexec.h\"\n#include \"{}\"\n", f.display())
}

/// Names of `extern "C"` kernels in preprocessed C++ (`__global__` expands to
/// `__attribute__((used))`).
fn kernel_names(text: &str) -> Vec<String> {
    let mark = "extern \"C\" __attribute__((used)) void ";
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find(mark) {
        rest = &rest[i + mark.len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.is_empty() && !names.contains(&name) {
            names.push(name);
        }
    }
    names
}
