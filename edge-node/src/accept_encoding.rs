//! A request's `Accept-Encoding` reduced to the one coding its cached variant stands for.
//!
//! Origins that compress answer with `Vary: Accept-Encoding`, and clients spell the same
//! preference many ways (`gzip, deflate, br`, `gzip, deflate, br, zstd`, `br;q=1.0,
//! gzip;q=0.8, *;q=0.1`): each spelling would be a variant of its own, fetched from the origin
//! and stored again. As Varnish and Fastly do, the edge reduces the field to the coding the
//! client is best served with (`br`, else `gzip`, else `zstd`, else none: identity) before
//! the cache and the origin see it, so at most four variants exist. The edge's own
//! compression is decided from the client's field as sent (pingora's compression module reads
//! it before the edge's request filter runs).
//!
//! Shadow fills ask for the coding the edge's clients ask for most ([`Mix`]): a copy of the
//! identity variant would not serve a browser asking for `br` when the origin varies on it.

use std::sync::atomic::{AtomicU64, Ordering};

use http::HeaderValue;
use pingora_http::RequestHeader;

/// A content coding a cached variant may hold, in the order the edge prefers them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    /// Brotli: smallest for text, sent by every current browser over HTTPS.
    Br,
    /// gzip: what nearly every client and origin supports.
    Gzip,
    /// Zstandard.
    Zstd,
}

const PREFERRED: [Coding; 3] = [Coding::Br, Coding::Gzip, Coding::Zstd];

impl Coding {
    /// Its `Accept-Encoding` token.
    pub fn token(self) -> &'static str {
        match self {
            Coding::Br => "br",
            Coding::Gzip => "gzip",
            Coding::Zstd => "zstd",
        }
    }

    fn index(coding: Option<Coding>) -> usize {
        coding.map_or(0, |c| 1 + c as usize)
    }
}

/// The coding the field lines `values` accept that the edge prefers; `None` for identity
/// (no field, nothing known accepted, or a field that is not text). A coding counts as
/// accepted when it is named with a non-zero weight, or `*` is and it is not named with a zero
/// one (RFC 9110 §12.5.3).
pub fn preferred<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> Option<Coding> {
    // For each preferred coding, then `*`: its weight where named (`None`: not named).
    let mut weights: [Option<bool>; 4] = [None; 4];
    for value in values {
        let Ok(value) = value.to_str() else {
            return None;
        };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
            let slot = match PREFERRED
                .iter()
                .position(|c| name.eq_ignore_ascii_case(c.token()))
            {
                Some(i) => i,
                None if name == "*" => 3,
                None => continue,
            };
            let accepted = !zero_weight(parts);
            // Named twice: any zero weight refuses it.
            weights[slot] = Some(weights[slot].unwrap_or(true) && accepted);
        }
    }
    let any = weights[3].unwrap_or(false);
    PREFERRED
        .iter()
        .zip(weights)
        .find(|(_, w)| w.unwrap_or(any))
        .map(|(c, _)| *c)
}

/// Whether the parameters of one list item (what follows its name) give it a weight of zero
/// (`q=0`, or a negative one, which no client means as a preference).
pub(crate) fn zero_weight<'a>(mut params: impl Iterator<Item = &'a str>) -> bool {
    params.any(|p| {
        p.split_once('=').is_some_and(|(k, v)| {
            k.trim().eq_ignore_ascii_case("q") && v.trim().parse::<f32>().is_ok_and(|q| q <= 0.0)
        })
    })
}

/// Replace `req`'s `Accept-Encoding` with the one coding it is served with, or remove it.
/// Returns that coding.
pub fn normalize(req: &mut RequestHeader) -> Option<Coding> {
    let lines = req.headers.get_all(http::header::ACCEPT_ENCODING);
    let coding = preferred(lines.iter());
    let mut lines = lines.iter();
    let as_is = match (coding, lines.next(), lines.next()) {
        (None, None, _) => true,
        (Some(c), Some(only), None) => only.as_bytes() == c.token().as_bytes(),
        _ => false,
    };
    if !as_is {
        match coding {
            Some(c) => {
                // Cannot fail: a static token is a valid value.
                let _ = req.insert_header(
                    http::header::ACCEPT_ENCODING,
                    HeaderValue::from_static(c.token()),
                );
            }
            None => {
                req.remove_header(&http::header::ACCEPT_ENCODING);
            }
        }
    }
    coding
}

/// How often the edge's clients were served each coding, so that shadow fills ask for the
/// variant they will want. Halved now and then, so a shift in clients shows within a while.
#[derive(Debug, Default)]
pub struct Mix {
    /// Identity, then [`PREFERRED`]'s codings.
    counts: [AtomicU64; 4],
}

/// Counts at which [`Mix`] halves them all.
const HALVE_AT: u64 = 1 << 20;

/// [`Mix::sample`] counts one request in this many once a thread counted [`WARM_UP`]: every
/// request would make the threads serving hits contend for the counters' cache line.
const SAMPLE_EVERY: u32 = 16;
/// Requests each thread counts before it samples.
const WARM_UP: u32 = 256;

impl Mix {
    /// One client request served `coding`, counted one time in [`SAMPLE_EVERY`] (per thread,
    /// after the first [`WARM_UP`]).
    pub fn sample(&self, coding: Option<Coding>) {
        thread_local! {
            static SEEN: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
        }
        let turn = SEEN.with(|seen| {
            let n = seen.get();
            let next = if n < WARM_UP {
                n + 1
            } else {
                WARM_UP + (n + 1 - WARM_UP) % SAMPLE_EVERY
            };
            seen.set(next);
            n < WARM_UP || next == WARM_UP
        });
        if turn {
            self.count(coding);
        }
    }

    fn count(&self, coding: Option<Coding>) {
        let n = self.counts[Coding::index(coding)].fetch_add(1, Ordering::Relaxed) + 1;
        if n >= HALVE_AT {
            // Racy by design: a few counts lost while halving do not change the ranking.
            for c in &self.counts {
                c.store(c.load(Ordering::Relaxed) / 2, Ordering::Relaxed);
            }
        }
    }

    /// The coding asked for most (identity when nothing was counted yet, or on a tie with it).
    pub fn most_asked(&self) -> Option<Coding> {
        let count = |c: Option<Coding>| self.counts[Coding::index(c)].load(Ordering::Relaxed);
        let mut best = (None, count(None));
        for c in PREFERRED {
            let n = count(Some(c));
            if n > best.1 {
                best = (Some(c), n);
            }
        }
        best.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn of(lines: &[&str]) -> Option<Coding> {
        let values: Vec<HeaderValue> = lines.iter().map(|l| l.parse().unwrap()).collect();
        preferred(values.iter())
    }

    #[test]
    fn the_preferred_accepted_coding_is_chosen() {
        use Coding::*;
        assert_eq!(of(&[]), None);
        assert_eq!(of(&["gzip, deflate, br"]), Some(Br));
        assert_eq!(of(&["gzip, deflate, br, zstd"]), Some(Br));
        assert_eq!(of(&["gzip, deflate"]), Some(Gzip));
        assert_eq!(of(&["GZIP"]), Some(Gzip));
        assert_eq!(of(&["deflate"]), None);
        assert_eq!(of(&["identity"]), None);
        assert_eq!(of(&["zstd"]), Some(Zstd));
        assert_eq!(of(&["br;q=0, gzip;q=0.5"]), Some(Gzip));
        assert_eq!(of(&["br;q=0.0, gzip ; q=0.000, zstd;q=1"]), Some(Zstd));
        assert_eq!(of(&["*"]), Some(Br));
        assert_eq!(of(&["*;q=0.1, br;q=0"]), Some(Gzip));
        assert_eq!(of(&["*;q=0"]), None);
        assert_eq!(of(&["gzip", "br"]), Some(Br), "every field line counts");
        assert_eq!(of(&["br", "br;q=0"]), None, "a zero weight refuses it");
        assert_eq!(of(&[""]), None);
    }

    #[test]
    fn normalizing_rewrites_or_removes_the_field() {
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("Accept-Encoding", "gzip, deflate")
            .unwrap();
        req.append_header("Accept-Encoding", "br").unwrap();
        assert_eq!(normalize(&mut req), Some(Coding::Br));
        let lines: Vec<_> = req.headers.get_all("accept-encoding").iter().collect();
        assert_eq!(lines, ["br"]);
        let mut req = RequestHeader::build("GET", b"/", None).unwrap();
        req.append_header("Accept-Encoding", "deflate").unwrap();
        assert_eq!(normalize(&mut req), None);
        assert!(!req.headers.contains_key("accept-encoding"));
    }

    #[test]
    fn a_thread_counts_every_request_then_one_in_sixteen() {
        let mix = Mix::default();
        std::thread::scope(|s| {
            s.spawn(|| {
                for _ in 0..WARM_UP + 10 * SAMPLE_EVERY {
                    mix.sample(Some(Coding::Br));
                }
            });
        });
        let br = mix.counts[1].load(Ordering::Relaxed);
        assert_eq!(br, u64::from(WARM_UP + 10));
    }

    #[test]
    fn fills_ask_for_what_clients_ask_for_most() {
        let mix = Mix::default();
        assert_eq!(mix.most_asked(), None);
        mix.count(Some(Coding::Gzip));
        assert_eq!(mix.most_asked(), Some(Coding::Gzip));
        mix.count(None);
        assert_eq!(mix.most_asked(), None, "a tie goes to identity");
        mix.count(Some(Coding::Br));
        mix.count(Some(Coding::Br));
        assert_eq!(mix.most_asked(), Some(Coding::Br));
        mix.counts[2].store(HALVE_AT - 1, Ordering::Relaxed);
        mix.count(Some(Coding::Gzip));
        assert_eq!(mix.counts[2].load(Ordering::Relaxed), HALVE_AT / 2);
        assert_eq!(mix.counts[1].load(Ordering::Relaxed), 1);
        assert_eq!(mix.most_asked(), Some(Coding::Gzip));
    }
}
