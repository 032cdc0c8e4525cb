//! The per-request traces as the replayer sends them: time, object key (path without query),
//! object size (the largest the trace logged for the key) and client region
//! (`fnv1a64(client) % 2`, as the forecaster's training data).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{bail, Context};

/// One request of a trace.
#[derive(Debug, Clone)]
pub struct Request {
    /// Unix seconds.
    pub ts: i64,
    /// Path without query.
    pub path: String,
    /// Object size in bytes (per key, the trace's largest).
    pub size: u64,
    /// 0 = eu, 1 = us.
    pub region: u8,
    /// Who asked: an address in the documentation range 2001:db8::/32 made from the
    /// trace's client field, which the replay sends in `X-Forwarded-For`, so the broker
    /// tells the trace's clients apart as it would real ones (co-access pairs a client's
    /// own requests).
    pub client: std::net::Ipv6Addr,
}

/// The address that stands for the trace's client `id`.
fn client_addr(id: &str) -> std::net::Ipv6Addr {
    std::net::Ipv6Addr::from((0x2001_0db8_u128 << 96) | u128::from(fnv1a64(id)))
}

/// A parsed trace.
pub struct Trace {
    /// Host the objects are served under.
    pub host: &'static str,
    /// Requests in time order.
    pub requests: Vec<Request>,
}

impl Trace {
    /// Move each region's requests by its entry of `shifts_secs` (region `i` by
    /// `shifts_secs[i]`, missing entries 0) and restore time order: a single site's clients
    /// split into regions as if they lived in different time zones, so each region's daily
    /// peak comes at its own hour. The order within a region is kept.
    pub fn shift_regions(&mut self, shifts_secs: &[i64]) {
        if shifts_secs.iter().all(|s| *s == 0) {
            return;
        }
        for r in &mut self.requests {
            r.ts += shifts_secs.get(usize::from(r.region)).copied().unwrap_or(0);
        }
        self.requests.sort_by_key(|r| r.ts);
    }

    /// Keep only the forecaster's held-out test tail: the requests from the bucket at 85% of
    /// the trace's 15-minute buckets on, the split of `models/train/data.py`
    /// (`split_bounds`), so a replay judges the LSTM on demand it neither trained nor was
    /// calibrated on.
    pub fn held_out(&mut self) {
        let (Some(first), Some(last)) = (self.requests.first(), self.requests.last()) else {
            return;
        };
        let b = SPLIT_BUCKET_SECS;
        let first_bucket = first.ts - first.ts.rem_euclid(b);
        let n_buckets = (last.ts - last.ts.rem_euclid(b) - first_bucket) / b + 1;
        let test_start = first_bucket + n_buckets * 85 / 100 * b;
        self.requests.retain(|r| r.ts >= test_start);
    }

    /// Shorten every silence longer than two weeks by whole weeks, to between one and two
    /// weeks: hour of day and day of week stay as traced (the forecaster's calendar features),
    /// a long silence still reads as one, and months without a request cost no replay time.
    pub fn fold_gaps(&mut self) {
        const WEEK: i64 = 7 * 86_400;
        let mut removed = 0;
        let mut prev: Option<i64> = None;
        for r in &mut self.requests {
            let ts = r.ts;
            if let Some(p) = prev {
                let weeks = (ts - p) / WEEK;
                if weeks >= 2 {
                    removed += (weeks - 1) * WEEK;
                }
            }
            prev = Some(ts);
            r.ts = ts - removed;
        }
    }

    /// Divide every object size by `divisor` (rounding up): the byte volumes of a trace of
    /// multi-gigabyte working sets, scaled to what one machine's loopback replays in minutes.
    /// Cache sizes follow the scaled working set and `bench/replay.sh` multiplies the per-GB
    /// prices by the same factor, so hit ratios and every dollar figure are unchanged.
    pub fn scale_sizes(&mut self, divisor: u64) {
        if divisor <= 1 {
            return;
        }
        for r in &mut self.requests {
            r.size = r.size.div_ceil(divisor);
        }
    }

    /// Sum of the sizes of distinct objects.
    pub fn working_set(&self) -> u64 {
        let mut seen: HashMap<&str, u64> = HashMap::new();
        for r in &self.requests {
            seen.insert(&r.path, r.size);
        }
        seen.values().sum()
    }
}

/// Bucket width of the forecaster's series (`models/train/data.py` `BUCKET_SECS`).
const SPLIT_BUCKET_SECS: i64 = 900;

fn fnv1a64(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn month(name: &str) -> Option<i64> {
    let months = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    months.iter().position(|m| *m == name).map(|i| i as i64 + 1)
}

/// `17/May/2015:10:05:03 +0000` → unix seconds.
fn apache_time(s: &str) -> Option<i64> {
    let (dt, tz) = s.split_once(' ')?;
    let mut it = dt.splitn(4, [':', '/']);
    let (d, mon, y) = (it.next()?, it.next()?, it.next()?);
    let hms = it.next()?;
    let mut t = hms.split(':').map(|x| x.parse::<i64>().ok());
    let (h, mi, se) = (t.next()??, t.next()??, t.next()??);
    let sign = if tz.starts_with('-') { -1 } else { 1 };
    let off = tz.trim_start_matches(['+', '-']);
    let off_secs = sign
        * (off.get(..2)?.parse::<i64>().ok()? * 3600 + off.get(2..4)?.parse::<i64>().ok()? * 60);
    let days = days_from_civil(y.parse().ok()?, month(mon)?, d.parse().ok()?);
    Some(days * 86_400 + h * 3600 + mi * 60 + se - off_secs)
}

/// `2015-02-15 05:11AM` (UTC) → unix seconds.
fn nasa_time(s: &str) -> Option<i64> {
    let (date, time) = s.trim().split_once(' ')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hm, ampm) = time.split_at(time.len().checked_sub(2)?);
    let (h, mi) = hm.split_once(':')?;
    let mut h: i64 = h.parse().ok()?;
    let mi: i64 = mi.parse().ok()?;
    match ampm {
        "AM" if h == 12 => h = 0,
        "PM" if h != 12 => h += 12,
        "AM" | "PM" => {}
        _ => return None,
    }
    Some(days_from_civil(y, m, day) * 86_400 + h * 3600 + mi * 60)
}

struct Raw {
    ts: i64,
    path: String,
    size: u64,
    client: String,
}

fn parse_apache(line: &str) -> Option<Raw> {
    let (client, rest) = line.split_once(' ')?;
    let time = rest.split_once('[')?.1.split_once(']')?.0;
    let mut quoted = line.splitn(3, '"');
    quoted.next()?;
    let request = quoted.next()?;
    let after = quoted.next()?;
    let mut req = request.split_whitespace();
    let (method, target) = (req.next()?, req.next()?);
    if method != "GET" && method != "HEAD" {
        return None;
    }
    let mut tail = after.split_whitespace();
    let _status = tail.next()?;
    let size = tail.next()?.parse().unwrap_or(0);
    Some(Raw {
        ts: apache_time(time)?,
        path: target.split('?').next()?.to_string(),
        size,
        client: client.to_string(),
    })
}

fn parse_nasa(line: &str) -> Option<Raw> {
    let f: Vec<&str> = line.split("|&|").collect();
    if f.len() < 9 {
        return None;
    }
    Some(Raw {
        ts: nasa_time(f[0])?,
        path: f[6].split('?').next()?.to_string(),
        size: f[8].trim().parse().ok()?,
        client: f[1].to_string(),
    })
}

/// Turns one log line into a request, or skips it.
type LineParser = fn(&str) -> Option<Raw>;

/// Parse `name` (`apache` or `nasa`) from the traces directory.
pub fn load(dir: &Path, name: &str) -> anyhow::Result<Trace> {
    let (file, host, parse): (&str, &'static str, LineParser) = match name {
        "apache" => (
            "elastic_apache_logs/apache_logs",
            "semicomplete.com",
            parse_apache,
        ),
        "nasa" => (
            "nasa_lpdaac_opendap/logs_for_opendap.txt.gz",
            "opendap.lpdaac",
            parse_nasa,
        ),
        other => bail!("unknown trace {other:?}: use apache or nasa"),
    };
    let path = dir.join(file);
    let f = std::fs::File::open(&path).with_context(|| format!("open {}", path.display()))?;
    let reader: Box<dyn Read> = if file.ends_with(".gz") {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    let mut raws = Vec::new();
    for line in BufReader::new(reader).split(b'\n') {
        let line = line?;
        if let Some(r) = parse(&String::from_utf8_lossy(&line)) {
            if r.path.starts_with('/') {
                raws.push(r);
            }
        }
    }
    raws.sort_by_key(|r| r.ts);
    let mut sizes: HashMap<&str, u64> = HashMap::new();
    for r in &raws {
        let s = sizes.entry(&r.path).or_default();
        *s = (*s).max(r.size);
    }
    let requests = raws
        .iter()
        .map(|r| Request {
            ts: r.ts,
            path: r.path.clone(),
            size: sizes[r.path.as_str()],
            region: (fnv1a64(&r.client) % 2) as u8,
            client: client_addr(&r.client),
        })
        .collect();
    Ok(Trace { host, requests })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(ts: i64, path: &str, region: u8) -> Request {
        Request {
            ts,
            path: path.into(),
            size: 2001,
            region,
            client: client_addr("c"),
        }
    }

    fn trace(requests: Vec<Request>) -> Trace {
        Trace {
            host: "h",
            requests,
        }
    }

    #[test]
    fn region_shifts_move_one_region_and_keep_time_order() {
        let mut t = trace(vec![
            req(0, "/a", 0),
            req(10, "/b", 1),
            req(20, "/c", 1),
            req(30, "/d", 0),
        ]);
        t.shift_regions(&[0, 25]);
        let got: Vec<(i64, &str)> = t.requests.iter().map(|r| (r.ts, r.path.as_str())).collect();
        assert_eq!(got, vec![(0, "/a"), (30, "/d"), (35, "/b"), (45, "/c")]);
    }

    #[test]
    fn the_held_out_tail_starts_at_85_percent_of_the_buckets() {
        // 100 buckets of 900 s: the tail starts at bucket 85.
        let mut t = trace(
            [0, 85 * 900 - 1, 85 * 900, 99 * 900 + 5]
                .map(|ts| req(ts, "/a", 0))
                .to_vec(),
        );
        t.held_out();
        let got: Vec<i64> = t.requests.iter().map(|r| r.ts).collect();
        assert_eq!(got, vec![85 * 900, 99 * 900 + 5]);
    }

    #[test]
    fn long_silences_fold_by_whole_weeks() {
        let week = 7 * 86_400;
        let mut t = trace(
            [0, 86_400, 86_400 + 8 * week + 3600, 86_400 + 9 * week]
                .map(|ts| req(ts, "/a", 0))
                .to_vec(),
        );
        t.fold_gaps();
        t.scale_sizes(1000);
        let got: Vec<i64> = t.requests.iter().map(|r| r.ts).collect();
        // A 1-day gap stays; 8 weeks + 1 h becomes 1 week + 1 h; 1 week − 1 h stays.
        let folded = 86_400 + week + 3600;
        assert_eq!(got, vec![0, 86_400, folded, folded + week - 3600]);
        assert!(t.requests.iter().all(|r| r.size == 3));
    }

    #[test]
    fn times_parse() {
        assert_eq!(
            apache_time("17/May/2015:10:05:03 +0000"),
            Some(1_431_857_103)
        );
        assert_eq!(
            apache_time("17/May/2015:12:05:03 +0200"),
            Some(1_431_857_103)
        );
        assert_eq!(nasa_time("2015-02-15 05:11AM"), Some(1_423_977_060));
        assert_eq!(nasa_time("2015-02-15 12:11AM"), Some(1_423_959_060));
        assert_eq!(nasa_time("2015-02-15 12:11PM"), Some(1_424_002_260));
    }

    #[test]
    fn lines_parse() {
        let a = parse_apache(r#"83.149.9.216 - - [17/May/2015:10:05:03 +0000] "GET /a/b.png?x=1 HTTP/1.1" 200 203023 "-" "UA""#).unwrap();
        assert_eq!((a.path.as_str(), a.size), ("/a/b.png", 203_023));
        assert!(parse_apache(
            r#"1.2.3.4 - - [17/May/2015:10:05:03 +0000] "POST /x HTTP/1.1" 200 1 "-" "-""#
        )
        .is_none());
        let n = parse_nasa("2015-02-15 05:11AM|&|0b3a|&|ASTGTM|&|2|&|7202|&|12974403|&|/opendap/x.nc.dods?crs|&|200|&|57752").unwrap();
        assert_eq!(
            (n.path.as_str(), n.size, n.client.as_str()),
            ("/opendap/x.nc.dods", 57_752, "0b3a")
        );
        assert_eq!(fnv1a64(""), 0xcbf2_9ce4_8422_2325);
        // Each client its own address, in the documentation range.
        assert_ne!(client_addr("0b3a"), client_addr("0b3b"));
        assert_eq!(client_addr("0b3a").segments()[..2], [0x2001, 0x0db8]);
    }
}
