//! Any bytes given to the GGUF reader give a model or an error, never a crash; whatever opens
//! is then used the way kojo uses a model (config, tokenizer, every tensor dequantized).
#![no_main]
use kojo::formats::GgufFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = GgufFile::from_bytes(data.to_vec(), "fuzz.gguf") else { return };
    let _ = kojo::model::ModelConfig::from_gguf(&g);
    if let Ok(tok) = kojo::tokenizer::Tokenizer::from_gguf(&g) {
        if let Ok(ids) = tok.encode("Hello <|im_start|> 日本 🤖 123", true, true) {
            let _ = tok.decode(&ids, true);
        }
    }
    for t in g.tensors.clone() {
        let _ = g.tensor_f32(&t.name);
    }
});
