//! The grammar mask's cost per token: a nested JSON schema walked token by token (mask, then
//! the document's next token) on SmolLM2's vocabulary (49k) and Gemma 3's (262k). One
//! element is one token (mask + consume). Needs models/ (scripts/fetch-models).
//!
//! `cargo bench --bench structured`

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kojo::formats::gguf::GgufFile;
use kojo::structured::{GrammarLimits, GrammarSpec, Grammars};
use kojo::tokenizer::Tokenizer;
use std::sync::Arc;

fn schema() -> serde_json::Value {
    serde_json::json!({
        "type": "object",
        "properties": {
            "order_id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{6}$"},
            "status": {"enum": ["pending", "shipped", "delivered", "cancelled"]},
            "customer": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 40},
                "email": {"type": "string", "format": "email"},
                "vip": {"type": "boolean"}},
                "required": ["name", "email"], "additionalProperties": false},
            "items": {"type": "array", "maxItems": 10, "items": {"type": "object", "properties": {
                "sku": {"type": "string"},
                "quantity": {"type": "integer", "minimum": 1, "maximum": 99},
                "price": {"type": "number", "minimum": 0}},
                "required": ["sku", "quantity", "price"], "additionalProperties": false}},
            "notes": {"anyOf": [{"type": "string"}, {"type": "null"}]}
        },
        "required": ["order_id", "status", "customer", "items"],
        "additionalProperties": false
    })
}

const DOC: &str = r#"{"order_id": "JP-004217", "status": "shipped", "customer": {"name": "山田 花子", "email": "hanako@example.jp", "vip": true}, "items": [{"sku": "KB-101", "quantity": 2, "price": 49.5}, {"sku": "MS-7", "quantity": 1, "price": 19.99}], "notes": "置き配希望"}"#;

fn masks(c: &mut Criterion) {
    let mut g = c.benchmark_group("grammar_mask");
    for file in [
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "gemma-3-270m-q4_k_m.gguf",
    ] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("models")
            .join(file);
        let Ok(gguf) = GgufFile::open(&path) else {
            eprintln!("skipping {file}: not in models/ (scripts/fetch-models)");
            continue;
        };
        let tok = Arc::new(Tokenizer::from_gguf(&gguf).unwrap());
        let n = tok.vocab_size();
        let grammars = Grammars::new(tok.clone(), n, GrammarLimits::default());
        let base = grammars
            .compile(&GrammarSpec::JsonSchema(schema()))
            .unwrap();
        let ids = tok.encode(DOC, false, false).unwrap();
        // the document is valid under the schema, token by token
        let mut check = base.fork();
        for &t in &ids {
            let m = check.mask().unwrap();
            assert!(
                m[t as usize / 32] >> (t % 32) & 1 == 1,
                "{file}: token {t} masked"
            );
            check.consume(t).unwrap();
        }
        g.throughput(Throughput::Elements(ids.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("nested_schema", format!("{file} vocab {n}")),
            &ids,
            |b, ids| {
                b.iter(|| {
                    let mut c = base.fork();
                    for &t in ids {
                        criterion::black_box(c.mask().unwrap());
                        c.consume(t).unwrap();
                    }
                })
            },
        );
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = masks
}
criterion_main!(benches);
