//! Truncated, corrupted and hand-crafted malicious model files are rejected with clear errors
//! (file, field, byte offset), never a panic, a huge allocation or an out-of-bounds read.

mod common;
use common::*;
use kojo::formats::gguf::GgufFile;
use kojo::formats::gguf_write::GgufWriter;
use kojo::formats::quant::GgmlType;
use kojo::formats::safetensors::SafetensorsModel;
use kojo::formats::Value;

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A small valid GGUF with every metadata type, nested arrays and three tensors; the
/// unknown-type tensor comes first so the file ends with a known tensor's data.
fn sample() -> Vec<u8> {
    GgufWriter::new()
        .kv("general.architecture", Value::String("llama".into()))
        .kv("u8", Value::U8(7))
        .kv("i8", Value::I8(-7))
        .kv("u16", Value::U16(700))
        .kv("i16", Value::I16(-700))
        .kv("u32", Value::U32(70000))
        .kv("i32", Value::I32(-70000))
        .kv("u64", Value::U64(1 << 40))
        .kv("i64", Value::I64(-(1 << 40)))
        .kv("f32", Value::F32(1.5))
        .kv("f64", Value::F64(-2.25))
        .kv("bool", Value::Bool(true))
        .kv("str", Value::String("日本語".into()))
        .kv(
            "nested",
            Value::Array(vec![
                Value::Array(vec![Value::U32(1), Value::U32(2)]),
                Value::Array(vec![Value::U32(3)]),
            ]),
        )
        .kv(
            "strings",
            Value::Array(vec![Value::String("a".into()), Value::String("bc".into())]),
        )
        .tensor("mystery", &[32], GgmlType::Other(99), vec![0xAB; 64])
        .tensor(
            "a",
            &[4, 2],
            GgmlType::F32,
            f32_bytes(&[1., 2., 3., 4., 5., 6., 7., 8.]),
        )
        .tensor("b", &[32], GgmlType::Q8_0, {
            let mut b = half::f16::from_f32(0.5).to_bits().to_le_bytes().to_vec();
            b.extend((0..32).map(|i| i as u8));
            b
        })
        .to_bytes()
}

fn parse(bytes: &[u8]) -> Result<GgufFile, kojo::formats::FormatError> {
    GgufFile::from_bytes(bytes.to_vec(), "test.gguf")
}

#[test]
fn sample_parses_with_every_value_type() {
    let g = parse(&sample()).unwrap();
    assert_eq!(g.version, 3);
    assert_eq!(g.get("i16"), Some(&Value::I16(-700)));
    assert_eq!(g.get("i64"), Some(&Value::I64(-(1 << 40))));
    assert_eq!(g.get("f64"), Some(&Value::F64(-2.25)));
    assert_eq!(g.get_str("str"), Some("日本語"));
    assert_eq!(
        g.get("nested").unwrap().as_array().unwrap()[0]
            .as_array()
            .unwrap()[1],
        Value::U32(2)
    );
    assert_eq!(
        g.tensor_f32("a").unwrap(),
        vec![1., 2., 3., 4., 5., 6., 7., 8.]
    );
    assert_eq!(g.tensor_f32("b").unwrap()[3], 1.5);
    assert_eq!(g.tensor("a").unwrap().dims, vec![4, 2]);
}

#[test]
fn unknown_tensor_type_is_an_error_only_when_used() {
    let g = parse(&sample()).unwrap();
    let e = g.tensor_f32("mystery").unwrap_err().to_string();
    assert!(
        e.contains("test.gguf") && e.contains("mystery") && e.contains("not supported"),
        "{e}"
    );
}

#[test]
fn every_truncation_is_rejected_without_panic() {
    let full = sample();
    let g = parse(&full).unwrap();
    let b = g.tensor("b").unwrap();
    let end_of_data = (g.data_offset + b.offset + 34) as usize;
    for len in 0..full.len() {
        let r = parse(&full[..len]);
        if len < end_of_data {
            let e = r
                .err()
                .unwrap_or_else(|| panic!("truncated to {len} bytes was accepted"));
            let msg = e.to_string();
            assert!(
                msg.starts_with("test.gguf: ") && msg.contains("byte offset"),
                "{msg}"
            );
        }
    }
}

#[test]
fn random_corruption_never_panics() {
    let full = sample();
    let mut state = 0x9E3779B97F4A7C15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let mut b = full.clone();
        for _ in 0..1 + next() % 4 {
            let i = (next() % b.len() as u64) as usize;
            b[i] = next() as u8;
        }
        if let Ok(g) = parse(&b) {
            for t in g.tensors.clone() {
                let _ = g.tensor_f32(&t.name);
            }
        }
    }
}

/// Offsets of fields in the sample, found by scanning for known byte patterns.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len())
        .position(|w| w == needle)
        .expect("pattern")
}

fn expect_err(bytes: &[u8], want: &[&str]) {
    let e = parse(bytes)
        .err()
        .expect("corrupt file accepted")
        .to_string();
    for w in want {
        assert!(e.contains(w), "error {e:?} should mention {w:?}");
    }
}

#[test]
fn hand_corrupted_headers_name_the_field() {
    let full = sample();
    let mut b = full.clone();
    b[0] = b'X';
    expect_err(&b, &["magic", "byte offset 0"]);

    for v in [1u32, 4] {
        let mut b = full.clone();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        expect_err(&b, &["version", &format!("version {v}")]);
    }

    let mut b = full.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    expect_err(&b, &["tensor_count", "byte offset 8"]);

    let mut b = full.clone();
    b[16..24].copy_from_slice(&(1u64 << 40).to_le_bytes());
    expect_err(&b, &["kv_count", "byte offset 16"]);

    // first key's length → huge
    let mut b = full.clone();
    b[24..32].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    expect_err(&b, &["metadata[0].key", "byte offset 24"]);

    // the "strings" array's length → huge
    let mut b = full.clone();
    let at = find(&b, b"strings") + 7 + 4 + 4; // key, value type, element type
    b[at..at + 8].copy_from_slice(&(1u64 << 50).to_le_bytes());
    expect_err(&b, &["metadata 'strings'", "array_len"]);

    // bool byte 2
    let mut b = full.clone();
    let at = find(&b, b"bool") + 4 + 4;
    b[at] = 2;
    expect_err(&b, &["metadata 'bool'", "0 or 1"]);

    // unknown value type
    let mut b = full.clone();
    let at = find(&b, b"f64") + 3;
    b[at..at + 4].copy_from_slice(&77u32.to_le_bytes());
    expect_err(&b, &["metadata 'f64'", "unknown value type 77"]);

    // tensor 'a': n_dims 5, then dims 0, then an offset beyond the file, then unaligned
    let after = find(&full, b"mystery");
    let name_at = after + find(&full[after..], b"\x01\x00\x00\x00\x00\x00\x00\x00a") + 9;
    let mut b = full.clone();
    b[name_at..name_at + 4].copy_from_slice(&5u32.to_le_bytes());
    expect_err(&b, &["tensor 'a'.n_dims"]);
    let mut b = full.clone();
    b[name_at + 4..name_at + 12].copy_from_slice(&0u64.to_le_bytes());
    expect_err(&b, &["tensor 'a'.ne[0]"]);
    let off_at = name_at + 4 + 16 + 4;
    let mut b = full.clone();
    b[off_at..off_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    expect_err(&b, &["tensor 'a'.offset", "past the end"]);
    let mut b = full.clone();
    b[off_at..off_at + 8].copy_from_slice(&(u64::MAX - 31).to_le_bytes());
    expect_err(&b, &["tensor 'a'.offset"]);
    let mut b = full.clone();
    b[off_at..off_at + 8].copy_from_slice(&3u64.to_le_bytes());
    expect_err(&b, &["tensor 'a'.offset", "alignment"]);
}

#[test]
fn deep_nesting_duplicates_and_alignment() {
    let mut v = Value::U8(1);
    for _ in 0..20 {
        v = Value::Array(vec![v]);
    }
    expect_err(
        &GgufWriter::new().kv("deep", v).to_bytes(),
        &["nested deeper"],
    );
    let dup = GgufWriter::new()
        .kv("k", Value::U8(1))
        .kv("k", Value::U8(2))
        .to_bytes();
    expect_err(&dup, &["metadata 'k'", "duplicate"]);
    let bad_align = GgufWriter::new()
        .kv("general.alignment", Value::U32(24))
        .to_bytes();
    expect_err(&bad_align, &["general.alignment", "power-of-two"]);
    let row = GgufWriter::new()
        .tensor("q", &[16], GgmlType::Q4_0, vec![0; 18])
        .to_bytes();
    expect_err(&row, &["tensor 'q'.ne[0]", "block size"]);
}

#[test]
fn cli_names_the_file_and_offset() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.gguf");
    std::fs::write(&p, &sample()[..100]).unwrap();
    let out = kojo(&["inspect", p.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("broken.gguf") && err.contains("byte offset"),
        "{err}"
    );
    let out = kojo(&["inspect", dir.path().join("absent.gguf").to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("absent.gguf"));
    // an empty file
    std::fs::write(&p, b"").unwrap();
    let out = kojo(&["tokenize", "-m", p.to_str().unwrap(), "x"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("magic"));
}

// ---- safetensors ----

fn st_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

fn st_sample() -> Vec<u8> {
    let mut data = f32_bytes(&[1.0, -2.0]);
    data.extend(half::f16::from_f32(0.5).to_bits().to_le_bytes());
    data.extend(half::bf16::from_f32(-3.0).to_bits().to_le_bytes());
    data.extend(7i64.to_le_bytes());
    st_file(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"h":{"dtype":"F16","shape":[1],"data_offsets":[8,10]},"b":{"dtype":"BF16","shape":[1,1],"data_offsets":[10,12]},"i":{"dtype":"I64","shape":[1],"data_offsets":[12,20]},"__metadata__":{"format":"pt"}}"#,
        &data,
    )
}

#[test]
fn safetensors_reads_float_types_and_rejects_others_on_use() {
    let m = SafetensorsModel::from_bytes(st_sample(), "m.safetensors").unwrap();
    assert_eq!(m.tensor_f32("a").unwrap(), vec![1.0, -2.0]);
    assert_eq!(m.tensor_f32("h").unwrap(), vec![0.5]);
    assert_eq!(m.tensor_f32("b").unwrap(), vec![-3.0]);
    let e = m.tensor_f32("i").unwrap_err().to_string();
    assert!(e.contains("m.safetensors") && e.contains("I64"), "{e}");
}

#[test]
fn safetensors_truncations_and_corruptions_are_errors() {
    let full = st_sample();
    for len in 0..full.len() {
        let e = SafetensorsModel::from_bytes(full[..len].to_vec(), "m.safetensors");
        let msg = e
            .err()
            .unwrap_or_else(|| panic!("truncated to {len} accepted"))
            .to_string();
        assert!(msg.starts_with("m.safetensors: "), "{msg}");
    }
    let mut b = full.clone();
    b[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(SafetensorsModel::from_bytes(b, "m").is_err());
    let overlap = st_file(
        r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
        &[0; 8],
    );
    assert!(SafetensorsModel::from_bytes(overlap, "m").is_err());
    let wrong_size = st_file(
        r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    assert!(SafetensorsModel::from_bytes(wrong_size, "m").is_err());
    let huge = st_file(
        r#"{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,8]}}"#,
        &[0; 8],
    );
    assert!(SafetensorsModel::from_bytes(huge, "m").is_err());
    assert!(SafetensorsModel::from_bytes(st_file("not json", &[]), "m").is_err());
    let mut state = 12345u64;
    for _ in 0..20_000 {
        let mut b = full.clone();
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let i = (state >> 33) as usize % b.len();
        b[i] = (state >> 20) as u8;
        if let Ok(m) = SafetensorsModel::from_bytes(b, "m") {
            for n in m.tensors.keys().cloned().collect::<Vec<_>>() {
                let _ = m.tensor_f32(&n);
            }
        }
    }
}

#[test]
fn hf_folder_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type":"llama","hidden_size":8,"intermediate_size":16,"num_hidden_layers":1,"num_attention_heads":2,"vocab_size":4}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("model.safetensors"), &st_sample()[..30]).unwrap();
    let out = kojo(&["inspect", dir.path().to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model.safetensors"), "{err}");
    std::fs::write(dir.path().join("config.json"), "{").unwrap();
    let out = kojo(&["inspect", dir.path().to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.json"));
}
