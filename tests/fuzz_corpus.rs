//! The fuzz targets' inputs on the stable toolchain: every committed corpus seed
//! (`fuzz/corpus/TARGET/`), and deterministic byte mutations of each, through the same entry
//! points as `cargo fuzz` (`mirage_rt::fuzzing`). None may panic; the inputs that make one are
//! printed. The long fuzzing runs themselves are `cargo +nightly fuzz run TARGET` (fuzz/README.md).

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use mirage_rt::fuzzing::TARGETS;
use mirage_rt::ingest::wire::{parse_header, WireError};

/// Mutations per seed.
const MUTATIONS: usize = 400;

/// xorshift64*: a fixed, seedable stream of mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// Bytes that parsers care about: delimiters, signs, digits of huge numbers, NaN spellings.
const TOKENS: [&[u8]; 12] =
    [b"\n", b"\t", b"\x1f", b"\"", b"[", b"]", b"-", b"99999999999999999999", b"1e309", b"NaN", b"0", b"="];

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut d = seed.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(d.len() + 1);
        match rng.below(5) {
            0 if !d.is_empty() => {
                let i = at.min(d.len() - 1);
                d[i] ^= 1 << rng.below(8);
            }
            1 => d.truncate(at),
            2 => {
                let end = (at + rng.below(16)).min(d.len());
                d.drain(at..end);
            }
            3 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                d.splice(at..at, t.iter().copied());
            }
            _ => {
                let end = (at + rng.below(32)).min(d.len());
                let copy = d[at..end].to_vec();
                d.splice(at..at, copy);
            }
        }
    }
    d
}

#[test]
fn every_corpus_seed_and_its_mutations_are_answered_without_a_panic() {
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut runs = 0;
    for (name, target) in TARGETS {
        let dir = corpus.join(name);
        let mut seeds: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        seeds.sort();
        assert!(!seeds.is_empty(), "no seeds for {name}");
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
        for path in seeds {
            let seed = std::fs::read(&path).unwrap();
            let inputs = std::iter::once(seed.clone()).chain((0..MUTATIONS).map(|_| mutate(&seed, &mut rng)));
            for input in inputs {
                let r = catch_unwind(AssertUnwindSafe(|| target(&input)));
                assert!(
                    r.is_ok(),
                    "{name} panicked on {:?} (from {})",
                    String::from_utf8_lossy(&input),
                    path.display()
                );
                runs += 1;
            }
        }
    }
    assert!(runs > 5000, "{runs}");
}

#[test]
fn a_header_declaring_huge_dims_is_refused_before_any_allocation() {
    let header = br#"{"volIdx":1,"dtype":"float64","shape":[100000,100000,100000],"affine":[[2,0,0,0],[0,2,0,0],[0,0,2,0],[0,0,0,1]]}"#;
    match parse_header(header, 1 << 20) {
        Err(WireError::TooLarge { voxels, limit }) => {
            assert_eq!((voxels, limit), (1_000_000_000_000_000, 1 << 20))
        }
        other => panic!("{other:?}"),
    }
}
