//! Dequantization is bit-exact against the `gguf` Python package (llama.cpp's reference
//! dequantizers): random blocks of every supported type (fresh seed each run, printed), and every
//! tensor of both real models through `kojo tensors --sha256`.

mod common;
use common::*;
use kojo::formats::gguf_write::GgufWriter;
use kojo::formats::quant::{dequantize_to_vec, GgmlType};
use std::collections::HashMap;
use std::process::Command;

fn python_ref(args: &[&str]) -> String {
    let script = root().join("scripts/dequant_reference.py");
    let out = Command::new(python())
        .arg(&script)
        .args(args)
        .output()
        .expect("run python3");
    assert!(
        out.status.success(),
        "{} {args:?} failed: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        % 1_000_000
}

#[test]
fn random_blocks_match_gguf_package_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let seed = seed();
    eprintln!("seed {seed}");
    python_ref(&["random", dir.path().to_str().unwrap(), &seed.to_string()]);
    let manifest: HashMap<String, usize> =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest.len(), GgmlType::SUPPORTED.len());
    let mut gguf = GgufWriter::new();
    for ty in GgmlType::SUPPORTED {
        let name = ty.name();
        let n = manifest[&name];
        let data = std::fs::read(dir.path().join(format!("{name}.bin"))).unwrap();
        let want: Vec<u32> = std::fs::read(dir.path().join(format!("{name}.f32")))
            .unwrap()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let got: Vec<u32> = dequantize_to_vec(ty, &data, n)
            .unwrap()
            .iter()
            .map(|f| f.to_bits())
            .collect();
        assert_eq!(got.len(), want.len(), "{name}");
        if let Some(i) = (0..n).find(|&i| got[i] != want[i]) {
            panic!(
                "{name} (seed {seed}): weight {i} is {} ({:#x}), gguf says {} ({:#x})",
                f32::from_bits(got[i]),
                got[i],
                f32::from_bits(want[i]),
                want[i]
            );
        }
        gguf = gguf.tensor(&name, &[n as u64], ty, data);
    }
    // the same blocks, read back from a GGUF file through the CLI
    let file = dir.path().join("all-types.gguf");
    std::fs::write(
        &file,
        gguf.kv(
            "general.architecture",
            kojo::formats::Value::String("test".into()),
        )
        .to_bytes(),
    )
    .unwrap();
    let rows: serde_json::Value =
        serde_json::from_str(&kojo_ok(&["tensors", "--sha256", file.to_str().unwrap()])).unwrap();
    for row in rows.as_array().unwrap() {
        let name = row["name"].as_str().unwrap();
        let want = std::fs::read(dir.path().join(format!("{name}.f32"))).unwrap();
        use sha2::Digest;
        let hash = format!("{:x}", sha2::Sha256::digest(&want));
        assert_eq!(
            row["sha256"].as_str().unwrap(),
            hash,
            "{name} via kojo tensors"
        );
    }
}

fn model_tensors_match(model: &std::path::Path) {
    let m = model.to_str().unwrap();
    let want: serde_json::Value = serde_json::from_str(&python_ref(&["hashes", m])).unwrap();
    let got: serde_json::Value =
        serde_json::from_str(&kojo_ok(&["tensors", "--sha256", m])).unwrap();
    let got: HashMap<&str, &str> = got
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["sha256"].as_str().unwrap()))
        .collect();
    let want = want.as_array().unwrap();
    assert_eq!(got.len(), want.len());
    for w in want {
        let name = w["name"].as_str().unwrap();
        assert_eq!(
            got[name],
            w["sha256"].as_str().unwrap(),
            "{} tensor {name} ({})",
            model.display(),
            w["type"]
        );
    }
}

#[test]
fn smollm2_tensors_match_gguf_package() {
    model_tensors_match(&smollm2());
}

#[test]
fn gemma3_tensors_match_gguf_package() {
    model_tensors_match(&gemma3());
}
