//! The driver's mutation engine and runner.

use rand::Rng as _;

use crate::Target;

/// One mutated input from the corpus: 1–8 random edits (bit flips, interesting bytes,
/// inserted, deleted or repeated ranges, dictionary tokens, splices with another input).
pub fn mutate(
    rng: &mut impl rand::Rng,
    corpus: &[Vec<u8>],
    dictionary: &[&str],
    max_len: usize,
) -> Vec<u8> {
    let mut v = corpus[rng.random_range(0..corpus.len())].clone();
    for _ in 0..rng.random_range(1..=8) {
        let len = v.len();
        match rng.random_range(0..9) {
            0 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] ^= 1 << rng.random_range(0..8);
            }
            1 if len > 0 => {
                let i = rng.random_range(0..len);
                v[i] = [0, 0xff, 0x7f, 0x80, b'\n', b'=', b'/', b':', 0x1b, b'9']
                    [rng.random_range(0..10)];
            }
            2 => {
                let i = rng.random_range(0..=len);
                let n = rng.random_range(1..=16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.random()).collect();
                v.splice(i..i, bytes);
            }
            3 if len > 0 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(64));
                v.drain(i..i + n);
            }
            4 if len > 0 => {
                let i = rng.random_range(0..len);
                let n = rng.random_range(1..=(len - i).min(64));
                let chunk = v[i..i + n].to_vec();
                let at = rng.random_range(0..=len);
                for _ in 0..rng.random_range(1..=4) {
                    v.splice(at..at, chunk.iter().copied());
                }
            }
            5 if !dictionary.is_empty() => {
                let t = dictionary[rng.random_range(0..dictionary.len())];
                let at = rng.random_range(0..=len);
                v.splice(at..at, t.bytes());
            }
            6 => {
                let other = &corpus[rng.random_range(0..corpus.len())];
                if !other.is_empty() {
                    let i = rng.random_range(0..other.len());
                    let n = rng.random_range(1..=(other.len() - i));
                    let at = rng.random_range(0..=len);
                    v.splice(at..at, other[i..i + n].iter().copied());
                }
            }
            7 if len > 0 => v.truncate(rng.random_range(0..len)),
            _ => {
                // A length or count field made large or small.
                if len >= 2 {
                    let i = rng.random_range(0..len - 1);
                    let x: u16 = [0, 1, 0x7fff, 0xffff, 255, 256][rng.random_range(0..6)];
                    v[i..i + 2].copy_from_slice(&x.to_be_bytes());
                }
            }
        }
    }
    v.truncate(max_len);
    v
}

/// Runs `target` on `n` inputs mutated from its seeds (and `extra` inputs), with `seed` for
/// the random choices. Returns the inputs that panicked (at most `keep`).
pub fn run(t: &Target, n: u64, seed: u64, extra: &[Vec<u8>], keep: usize) -> Vec<Vec<u8>> {
    use rand::SeedableRng as _;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut corpus = (t.seeds)();
    corpus.extend(extra.iter().cloned());
    if corpus.is_empty() {
        corpus.push(Vec::new());
    }
    let mut crashes = Vec::new();
    for i in 0..n {
        let input = if (i as usize) < corpus.len() {
            corpus[i as usize].clone()
        } else {
            mutate(&mut rng, &corpus, t.dictionary, 4096)
        };
        if std::panic::catch_unwind(|| (t.run)(&input)).is_err() && crashes.len() < keep {
            crashes.push(input.clone());
        }
        // Grow the corpus now and then with an input that ran clean, so mutations stack.
        if i % 1024 == 0 && corpus.len() < 4096 && rng.random_bool(0.5) {
            corpus.push(input);
        }
    }
    crashes
}
