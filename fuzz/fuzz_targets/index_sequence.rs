#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| mirage_rt::fuzzing::index_sequence(data));
