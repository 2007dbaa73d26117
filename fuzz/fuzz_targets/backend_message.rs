#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| comfyume_fuzz::backend_message(data));
