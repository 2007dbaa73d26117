#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| comfyume_fuzz::ws_codec(data));
