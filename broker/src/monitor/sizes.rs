//! The object sizes co-access triggers ask for, remembered for a minute: a size is the mean
//! over a series' whole retention (a week of buckets), too long a scan to repeat for every
//! follower of every view of a busy page on the aggregator's one thread.

use std::collections::HashMap;

/// How long (seconds of record time) a resource's size is reused.
const KEEP_SECS: u64 = 60;
/// Resources remembered at most; past that the memory starts over. Keys are up to 2 KiB, so
/// this bounds it to about 16 MiB.
const MAX_RESOURCES: usize = 8192;

/// Resource → (the minute its size was read in, the size).
#[derive(Debug, Default)]
pub(super) struct SizeMemo {
    sizes: HashMap<String, (u64, Option<u64>)>,
}

impl SizeMemo {
    /// `resource`'s size at record time `ts`: the one read within the same minute, or what
    /// `read` answers now.
    pub(super) fn size(
        &mut self,
        resource: &str,
        ts: u64,
        read: impl FnOnce() -> Option<u64>,
    ) -> Option<u64> {
        let minute = ts / KEEP_SECS;
        if let Some((at, size)) = self.sizes.get(resource) {
            if *at == minute {
                return *size;
            }
        }
        let size = read();
        if self.sizes.len() >= MAX_RESOURCES && !self.sizes.contains_key(resource) {
            self.sizes.clear();
        }
        self.sizes.insert(resource.to_string(), (minute, size));
        size
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_size_is_read_once_a_minute() {
        let mut m = SizeMemo::default();
        assert_eq!(m.size("h/a", 120, || Some(10)), Some(10));
        assert_eq!(m.size("h/a", 179, || Some(11)), Some(10), "same minute");
        assert_eq!(m.size("h/a", 180, || Some(12)), Some(12), "read again");
        assert_eq!(m.size("h/b", 180, || None), None);
        for i in 0..MAX_RESOURCES {
            m.size(&format!("x/{i}"), 181, || None);
        }
        assert!(m.sizes.len() <= MAX_RESOURCES);
        assert_eq!(
            m.size("h/a", 181, || Some(13)),
            Some(13),
            "the memory started over"
        );
    }
}
