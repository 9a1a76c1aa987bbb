//! Any bytes given to the safetensors reader give a checkpoint or an error, never a crash.
#![no_main]
use kojo::formats::safetensors::SafetensorsModel;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = SafetensorsModel::from_bytes(data.to_vec(), "fuzz.safetensors") else { return };
    for name in m.tensors.keys().cloned().collect::<Vec<_>>() {
        let _ = m.tensor_f32(&name);
    }
});
