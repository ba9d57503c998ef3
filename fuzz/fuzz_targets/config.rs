//! Config loading: never panic on any text; an error always names a key.
#![no_main]
use libfuzzer_sys::fuzz_target;
use ringwire::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Err(e) = Config::from_toml(text) {
        assert!(!e.key.is_empty());
    }
});
