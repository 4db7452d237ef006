//! The integration tests, one binary: each file beside this one is a module, so the tests of
//! all of them share one link and run in parallel on the test harness's threads.

mod common;

mod architecture;
mod bench;
mod calibrate;
mod cli;
mod console;
mod crash;
mod decode;
mod export;
mod feedback;
mod file_replay;
mod fuzz_corpus;
mod glm;
mod listeners;
mod lsl_ingest;
mod mindeye2;
mod motion;
mod pyneal_ingest;
mod pyneal_peers;
mod scanner;
mod scanner_faults;
mod security;
mod simulator;
mod smooth;
