//! Bounded in-memory logs (threshold changes, anomaly events, ended shadows): the newest
//! entries are kept and the oldest dropped, so a log nobody reads cannot grow without end.

use std::collections::VecDeque;

/// Append `item` to `log`, first dropping the oldest entry when `log` already holds `cap`.
pub(crate) fn push_bounded<T>(log: &mut VecDeque<T>, item: T, cap: usize) {
    if log.len() >= cap {
        log.pop_front();
    }
    log.push_back(item);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_newest_entries() {
        let mut log = VecDeque::new();
        for i in 0..5 {
            push_bounded(&mut log, i, 3);
        }
        assert_eq!(log, [2, 3, 4]);
    }
}
