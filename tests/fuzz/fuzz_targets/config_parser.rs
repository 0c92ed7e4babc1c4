//! The run config parser and validator: any text must give a config or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mixlm_train::RunConfig;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = RunConfig::from_toml(text, "fuzz.toml", &[]);
    }
});
