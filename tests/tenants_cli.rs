//! `kojo tenants hash-key` and `kojo tenants check` as an operator runs them: the hash of a
//! key read on stdin, and every bad tenants file an error naming the file, line and field.

mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

fn hash(key: &str) -> String {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kojo"))
        .args(["tenants", "hash-key"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(key.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

#[test]
fn hash_key_and_check() {
    // sha256("secret"): `printf secret | sha256sum`; the trailing newline is not the key's
    let want = "2bb80d537b1da3e38bd30361aa855686bde0eacd7162fef6a25fe97bf527a25b";
    assert_eq!(hash("secret\n"), want);
    assert_eq!(hash("secret"), want);
    let (a, b, root) = (hash("key-a"), hash("key-b"), hash("root"));
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let good = format!(
        "[admin]\nkey_sha256 = [\"{root}\"]\n\n[[tenant]]\nname = \"acme\"\nkey_sha256 = [\"{a}\"]\nweight = 2.0\nrpm = 600\ntpm = 200000\nmax_concurrency = 32\n\n[[tenant]]\nname = \"lab\"\nkey_sha256 = [\"{b}\"]\nshare_prefix_cache = true\n"
    );
    let p = write("good.toml", &good);
    let out = kojo_ok(&["tenants", "check", p.to_str().unwrap()]);
    assert!(
        out.contains("2 tenants, 2 tenant keys, 1 admin keys: ok"),
        "{out}"
    );
    // (file text, line, what the message names)
    let t = |name: &str, key: &str, extra: &str| {
        format!("[[tenant]]\nname = \"{name}\"\nkey_sha256 = [\"{key}\"]\n{extra}")
    };
    let cases: Vec<(String, usize, &str)> = vec![
        (
            format!("{}\n{}", t("acme", &a, ""), t("acme", &b, "")),
            6,
            "two tenants are named 'acme'",
        ),
        (
            format!("{}\n{}", t("acme", &a, ""), t("lab", &a, "")),
            7,
            "also tenant 'acme'",
        ),
        (
            format!("[admin]\nkey_sha256 = [\"{a}\"]\n{}", t("acme", &a, "")),
            5,
            "also the admin",
        ),
        (t("acme", "abc123", ""), 3, "not a hex SHA-256"),
        (t("acme", &a, "colour = \"red\"\n"), 4, "colour"),
        (t("acme", &a, "rpm = -5\n"), 4, "rpm"),
        (t("acme", &a, "weight = 0\n"), 4, "tenant[0].weight"),
        (t("Acme Corp", &a, ""), 2, "tenant[0].name"),
        (
            "[[tenant]]\nname = \"x\"\nkey_sha256 = []\n".to_string(),
            2,
            "at least one key",
        ),
        ("[[tenant]\nname = \"x\"\n".to_string(), 1, ""),
    ];
    for (i, (text, line, msg)) in cases.iter().enumerate() {
        let p = write(&format!("bad{i}.toml"), text);
        let out = kojo(&["tenants", "check", p.to_str().unwrap()]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text}");
        let at = format!("bad{i}.toml:{line}:");
        assert!(
            err.contains(&at) && err.contains(msg),
            "case {i}: want {at} and {msg:?}: {err}"
        );
    }
    let out = kojo(&["tenants", "check", "/no/such/file.toml"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/no/such/file.toml"));
}
