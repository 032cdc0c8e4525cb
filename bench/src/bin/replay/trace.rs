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

    /// Sum of the sizes of distinct objects.
    pub fn working_set(&self) -> u64 {
        let mut seen: HashMap<&str, u64> = HashMap::new();
        for r in &self.requests {
            seen.insert(&r.path, r.size);
        }
        seen.values().sum()
    }
}

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
        })
        .collect();
    Ok(Trace { host, requests })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_shifts_move_one_region_and_keep_time_order() {
        let req = |ts, path: &str, region| Request {
            ts,
            path: path.into(),
            size: 1,
            region,
        };
        let mut t = Trace {
            host: "h",
            requests: vec![
                req(0, "/a", 0),
                req(10, "/b", 1),
                req(20, "/c", 1),
                req(30, "/d", 0),
            ],
        };
        t.shift_regions(&[0, 25]);
        let got: Vec<(i64, &str)> = t.requests.iter().map(|r| (r.ts, r.path.as_str())).collect();
        assert_eq!(got, vec![(0, "/a"), (30, "/d"), (35, "/b"), (45, "/c")]);
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
    }
}
