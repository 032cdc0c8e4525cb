//! Outcomes of ended shadows on their way to the broker's ledger, and what a graceful stop
//! leaves of them for the next process.
//!
//! The edge's shadow marks live in memory: a restart ends them. The last step of a graceful
//! stop, after the drain, ends every live mark ([`save_at_stop`], reported as removed: the
//! copy stays cached, whether it would have been used is not known unless it was) and writes
//! the outcomes the broker has not acknowledged to [`OUTCOMES_FILE`] in the cache directory;
//! the next process reads them back and reports them. Without it the broker would never price
//! those shadows: their fills' spend and their hits would be lost with every rolling upgrade.
//! The drain waits for the fills under way (each counts as in-flight work until its mark or
//! outcome is in the table), and the orders still queued end as dropped while they waited.
//! Fills still running when the drain's timeout ends it end with the process, unreported: the
//! stop tells the broker so, as a crash does (below).
//!
//! A crash leaves nothing to report, so the edge says so instead: a running process keeps
//! [`RUNNING_FILE`] in the cache directory, naming it, and its graceful stop removes it once
//! the outcomes are saved. A start that finds it, and no outcomes that process saved, tells
//! the broker that process's orders will never be reported ([`OutcomeLog::lost`]); every
//! order the broker placed names the process that accepted it, so the broker prices exactly
//! those itself.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::ShadowTable;
use crate::durable::{read_json, write_json, FileError};
use crate::sync::protocol::ShadowOutcome;

/// The file a graceful stop leaves, in the cache directory.
pub const OUTCOMES_FILE: &str = "shadow-outcomes.json";

/// The file a running process keeps in the cache directory ([`RunningMark`]) until its
/// graceful stop has saved its outcomes.
pub const RUNNING_FILE: &str = "shadow-process.running";

/// What [`RUNNING_FILE`] holds: the running process, and the processes whose outcomes (or
/// losses) it took up from the last stop, which it would lose with it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunningMark {
    /// The process's [`OutcomeLog::boot_id`].
    pub boot_id: u64,
    /// The processes whose saved outcomes it restored ([`SavedOutcomes::saved_by`]) and
    /// those it tells lost ([`OutcomeLog::lost_boots`]).
    #[serde(default)]
    pub carries: Vec<u64>,
}

impl RunningMark {
    /// The mark of a process starting with `log`, once it restored what the last stop saved
    /// ([`OutcomeLog::restore`]).
    pub fn of(log: &OutcomeLog) -> Self {
        let mut carries = log.lost_boots();
        if let Some(by) = *log.restored_from.lock() {
            push_lost(&mut carries, by);
        }
        RunningMark {
            boot_id: log.boot_id(),
            carries,
        }
    }

    /// Note in `dir` that the process is running, once its start can no longer fail and
    /// before it removes what the last one saved.
    pub fn write(&self, dir: &Path) -> io::Result<()> {
        write_json(&dir.join(RUNNING_FILE), self)
    }
}

/// The processes lost with the last process of `dir`, if it ended without a graceful stop,
/// given what was left saved ([`SavedOutcomes::load`]): it left its [`RUNNING_FILE`], and no
/// outcomes of its own (the file saved, if any, is an older process's that it took up and had
/// not removed, or cannot be read); then it, and every process it carried, is lost. None
/// when the mark cannot be read: it names no process.
pub fn crashed_processes(dir: &Path, saved: &Result<Option<SavedOutcomes>, FileError>) -> Vec<u64> {
    let Ok(Some(mark)) = read_json::<RunningMark>(&dir.join(RUNNING_FILE)) else {
        return Vec::new();
    };
    let stopped = matches!(saved, Ok(Some(s)) if s.saved_by == mark.boot_id);
    if stopped || mark.boot_id == 0 {
        return Vec::new();
    }
    let mut lost = mark.carries;
    push_lost(&mut lost, mark.boot_id);
    lost
}

/// Outcomes of ended shadows waiting for the broker's next stats poll. Bounded: when the
/// broker does not poll, the oldest are dropped (and counted) rather than growing forever.
///
/// A broker that acknowledges gets them in numbered batches ([`Self::batch`]): a batch stays
/// here until the broker says it has it, so a reply lost on the way (a timed-out poll) is
/// sent again rather than its outcomes lost.
pub struct OutcomeLog {
    inner: parking_lot::Mutex<(VecDeque<ShadowOutcome>, u64)>,
    /// The batch sent and not yet acknowledged, with its number.
    sent: parking_lot::Mutex<Option<(u64, Vec<ShadowOutcome>)>>,
    /// Saved for the next process ([`Self::freeze`]): no new batch is formed.
    frozen: AtomicBool,
    /// [`Self::lost`].
    lost: parking_lot::Mutex<Vec<u64>>,
    /// Restored outcomes ([`Self::restore`]) the broker has not acknowledged yet.
    restored_left: AtomicUsize,
    /// The process that saved them ([`SavedOutcomes::saved_by`]).
    restored_from: parking_lot::Mutex<Option<u64>>,
    /// [`Self::boot_id`].
    boot_id: u64,
}

impl Default for OutcomeLog {
    fn default() -> Self {
        OutcomeLog {
            inner: Default::default(),
            sent: Default::default(),
            frozen: Default::default(),
            lost: Default::default(),
            restored_left: Default::default(),
            restored_from: Default::default(),
            boot_id: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64),
        }
    }
}

/// What a graceful stop leaves for the next process: the outcomes the broker has not
/// acknowledged.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedOutcomes {
    /// The batch sent and not acknowledged, with its number: sent again under that number,
    /// so a broker that did receive it (and acknowledges it) does not price it twice.
    pub sent: Option<(u64, Vec<ShadowOutcome>)>,
    /// Outcomes not sent yet, oldest first.
    pub queued: Vec<ShadowOutcome>,
    /// [`OutcomeLog::lost`], carried to the next process (a broker that has not polled since
    /// an earlier crash still learns of it), with the saving process itself when fills it had
    /// accepted were still running, and the process whose restored outcomes it hands on.
    #[serde(default)]
    pub lost: Vec<u64>,
    /// The [`OutcomeLog::boot_id`] of the process that saved it (0: a build before it).
    #[serde(default)]
    pub saved_by: u64,
}

impl SavedOutcomes {
    /// Outcomes it holds.
    pub fn len(&self) -> usize {
        self.queued.len() + self.sent.as_ref().map_or(0, |(_, b)| b.len())
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Write it to [`OUTCOMES_FILE`] in `dir` ([`write_json`]); with nothing to keep, remove
    /// an older file instead.
    pub fn save(&self, dir: &Path) -> io::Result<()> {
        if self.is_empty() && self.lost.is_empty() {
            return Self::taken(dir);
        }
        write_json(&dir.join(OUTCOMES_FILE), self)
    }

    /// What a stopped process left in `dir`. The file stays until [`Self::taken`], once the
    /// start can no longer fail: a start that does keeps it for the next. A file this build
    /// cannot read is moved aside (`.unread`), for the operator, and reported.
    pub fn load(dir: &Path) -> Result<Option<SavedOutcomes>, FileError> {
        let path = dir.join(OUTCOMES_FILE);
        match read_json::<SavedOutcomes>(&path) {
            Err(e @ FileError::Format { .. }) => {
                let aside = dir.join(format!("{OUTCOMES_FILE}.unread"));
                let _ = std::fs::rename(&path, aside);
                Err(e)
            }
            other => other,
        }
    }

    /// Remove the file [`Self::load`] read: its outcomes are this process's now, to report,
    /// and to save again at its own stop.
    pub fn taken(dir: &Path) -> io::Result<()> {
        match std::fs::remove_file(dir.join(OUTCOMES_FILE)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }
}

/// The last step of a graceful stop, after the drain (so a batch the broker acknowledged
/// during it is not saved again): end `table`'s live marks, cut its outcome log
/// ([`OutcomeLog::freeze`]) and save what the broker has not acknowledged, the ended marks
/// included whatever the log's bound, in `dir`. The marks ended and the outcomes saved.
pub async fn save_at_stop(table: &ShadowTable, dir: PathBuf) -> io::Result<(usize, usize)> {
    // Fills the drain's timeout cut short end with the process, unreported: the next process
    // tells their orders lost, once the outcomes saved here are in. (Not this one: a poll
    // meanwhile would have those outcomes' orders priced lost, then again when they come.)
    let cut_short = table.filling();
    let ended = table.end_all(Instant::now());
    let marks = ended.len();
    let mut saved = table.outcomes().freeze();
    saved.queued.extend(ended);
    if cut_short {
        push_lost(&mut saved.lost, table.outcomes().boot_id());
    }
    let outcomes = saved.len();
    // Saved, the mark goes: what this process accepted is reported, or named lost, by the
    // next one.
    let stopped = move || {
        saved.save(&dir)?;
        match std::fs::remove_file(dir.join(RUNNING_FILE)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    };
    tokio::task::spawn_blocking(stopped)
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)))?;
    Ok((marks, outcomes))
}

impl OutcomeLog {
    /// Most outcomes kept between polls.
    pub const CAPACITY: usize = 20_000;

    /// Record one ended shadow.
    pub fn push(&self, o: ShadowOutcome) {
        let mut g = self.inner.lock();
        if g.0.len() >= Self::CAPACITY {
            g.0.pop_front();
            g.1 += 1;
            self.gone(1);
        }
        g.0.push_back(o);
    }

    /// `n` outcomes from the front of the log are gone (acknowledged, or dropped): as many of
    /// the restored ones, which come first.
    fn gone(&self, n: usize) {
        let _ = self
            .restored_left
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |left| {
                Some(left.saturating_sub(n))
            });
    }

    /// Take the oldest outcomes whose encoding fits about `budget` bytes (at least one); the
    /// rest wait for the next poll. A reply must fit one frame, and after a long gap between
    /// polls the log holds far more than that.
    pub fn drain_within(&self, budget: usize) -> Vec<ShadowOutcome> {
        let mut g = self.inner.lock();
        let mut used = 0;
        let n =
            g.0.iter()
                .take_while(|o| {
                    // Escaping can double a key; the other fields take at most 256 bytes
                    // (every number at u64::MAX).
                    used += 2 * o.key.len() + 256;
                    used <= budget
                })
                .count()
                .max(1)
                .min(g.0.len());
        g.0.drain(..n).collect()
    }

    /// Outcomes dropped because nobody polled.
    pub fn dropped(&self) -> u64 {
        self.inner.lock().1
    }

    /// Note that the outcomes of the orders process `boot_id` accepted that are not in this
    /// log will never be reported: it ended without a graceful stop.
    pub fn lost(&self, boot_id: u64) {
        push_lost(&mut self.lost.lock(), boot_id);
    }

    /// Identifies the process whose outcomes these are (its start time in ns):
    /// [`crate::sync::protocol::StatsReport::boot_id`].
    pub fn boot_id(&self) -> u64 {
        self.boot_id
    }

    /// The processes whose unreported outcomes are known lost, the latest last.
    pub fn lost_boots(&self) -> Vec<u64> {
        self.lost.lock().clone()
    }

    /// [`Self::lost_boots`] as a stats report tells them
    /// ([`crate::sync::protocol::StatsReport::lost_boots`]): none until the broker has every
    /// restored outcome, which may be of those processes' orders too; told earlier, the
    /// broker would price the orders of the ones still to come as lost.
    pub fn lost_boots_to_tell(&self) -> Vec<u64> {
        if self.restored_left.load(Ordering::Acquire) > 0 {
            return Vec::new();
        }
        self.lost_boots()
    }

    /// The batch for a stats reply and its number, for a broker that acknowledged batch
    /// `ack` (the last one it received; batches are numbered from `first_seq`, which differs
    /// per process so a restarted edge's numbers are new). The unacknowledged batch is sent
    /// again; otherwise the next outcomes within `budget` bytes form a new one. `(0, [])`
    /// when there is nothing to send. A broker that does not acknowledge (`ack` `None`) gets
    /// the outcomes drained, unnumbered, as before.
    pub fn batch(
        &self,
        ack: Option<u64>,
        first_seq: u64,
        budget: usize,
    ) -> (u64, Vec<ShadowOutcome>) {
        let mut sent = self.sent.lock();
        if self.frozen.load(Ordering::Acquire) {
            // Only the batch the saved file holds as sent, under its number.
            return match (&*sent, ack) {
                (Some((seq, batch)), Some(ack)) if *seq != ack => (*seq, batch.clone()),
                _ => (0, Vec::new()),
            };
        }
        let Some(ack) = ack else {
            drop(sent);
            let drained = self.drain_within(budget);
            self.gone(drained.len());
            return (0, drained);
        };
        match &*sent {
            Some((seq, acked)) if *seq == ack => {
                self.gone(acked.len());
                *sent = None;
            }
            Some((seq, batch)) => return (*seq, batch.clone()),
            None => {}
        }
        if self.inner.lock().0.is_empty() {
            return (0, Vec::new());
        }
        let batch = self.drain_within(budget);
        let seq = if ack >= first_seq { ack + 1 } else { first_seq };
        *sent = Some((seq, batch.clone()));
        (seq, batch)
    }

    /// Stop forming batches and return what the broker has not acknowledged, to be saved for
    /// the next process. From here on a poll is sent only the batch already sent (again, under
    /// its number): what the broker is sent after the cut is what the saved file holds, so
    /// the next process reports nothing twice and loses nothing. Outcomes pushed later are not
    /// saved.
    pub fn freeze(&self) -> SavedOutcomes {
        let sent = self.sent.lock();
        self.frozen.store(true, Ordering::Release);
        let inner = self.inner.lock();
        let mut lost = self.lost_boots();
        // Outcomes handed on again before the broker had them: their process is named as
        // lost with them, told once they are in (any order of it still open then is lost),
        // or a crash of the next process would lose them unnamed.
        if self.restored_left.load(Ordering::Acquire) > 0 {
            if let Some(from) = *self.restored_from.lock() {
                push_lost(&mut lost, from);
            }
        }
        SavedOutcomes {
            sent: sent.clone(),
            queued: inner.0.iter().cloned().collect(),
            lost,
            saved_by: self.boot_id,
        }
    }

    /// Take up what a stopped process saved: its sent batch is sent again under its number,
    /// its queued outcomes go before any of this process's.
    pub fn restore(&self, saved: SavedOutcomes) {
        for boot_id in &saved.lost {
            self.lost(*boot_id);
        }
        self.restored_left.fetch_add(saved.len(), Ordering::AcqRel);
        if !saved.is_empty() && saved.saved_by != 0 {
            *self.restored_from.lock() = Some(saved.saved_by);
        }
        let mut sent = self.sent.lock();
        debug_assert!(sent.is_none(), "restored before any poll");
        if sent.is_none() {
            *sent = saved.sent;
        }
        let mut g = self.inner.lock();
        for o in saved.queued.into_iter().rev() {
            g.0.push_front(o);
        }
        while g.0.len() > Self::CAPACITY {
            g.0.pop_front();
            g.1 += 1;
            self.gone(1);
        }
    }
}

/// Processes told lost, at most: the broker prices each when it first hears of it.
pub const LOST_KEPT: usize = 16;

/// Add `boot_id` to `lost` (once), dropping the oldest past [`LOST_KEPT`].
fn push_lost(lost: &mut Vec<u64>, boot_id: u64) {
    if !lost.contains(&boot_id) {
        lost.push(boot_id);
    }
    let excess = lost.len().saturating_sub(LOST_KEPT);
    lost.drain(..excess);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A batch stays until the broker acknowledges it: a lost reply is sent again whole,
    /// and the next batch comes only after the acknowledgement.
    #[test]
    fn outcome_batches_wait_for_their_acknowledgement() {
        let log = OutcomeLog::default();
        let first = 1_000;
        assert_eq!(
            log.batch(Some(0), first, 1 << 20),
            (0, vec![]),
            "nothing yet"
        );
        log.push(outcome("h/a".into()));
        log.push(outcome("h/b".into()));
        let (seq, batch) = log.batch(Some(0), first, 1 << 20);
        assert_eq!((seq, batch.len()), (first, 2));
        log.push(outcome("h/c".into()));
        assert_eq!(
            log.batch(Some(0), first, 1 << 20),
            (seq, batch),
            "the reply was lost"
        );
        let (next, batch) = log.batch(Some(seq), first, 1 << 20);
        assert_eq!((next, batch.len()), (first + 1, 1));
        assert_eq!(batch[0].key, "h/c");
        assert_eq!(log.batch(Some(next), first, 1 << 20), (0, vec![]));
        // A broker that does not acknowledge drains, unnumbered.
        log.push(outcome("h/d".into()));
        assert_eq!(log.batch(None, first, 1 << 20).0, 0);
        assert_eq!(log.batch(Some(next), first, 1 << 20), (0, vec![]));
    }

    /// A stop saves what the broker has not acknowledged and hands out nothing new after the
    /// cut; the next process sends the saved batch again under its number (dropped once the
    /// broker acknowledges it: it had it) and the queued outcomes after it.
    #[test]
    fn a_stop_saves_what_the_broker_has_not_acknowledged_and_the_next_process_sends_it() {
        let dir = tempfile::tempdir().unwrap();
        let old = OutcomeLog::default();
        for k in ["h/a", "h/b"] {
            old.push(outcome(k.into()));
        }
        let (seq, sent) = old.batch(Some(0), 1_000, 1 << 20);
        old.push(outcome("h/c".into()));
        let saved = old.freeze();
        assert_eq!(saved.len(), 3);
        old.push(outcome("h/late".into()));
        assert_eq!(
            old.batch(Some(0), 1_000, 1 << 20),
            (seq, sent.clone()),
            "only the sent batch, again"
        );
        assert_eq!(old.batch(Some(seq), 1_000, 1 << 20), (0, vec![]));
        assert_eq!(old.batch(None, 1_000, 1 << 20), (0, vec![]));
        saved.save(dir.path()).unwrap();

        let taken = SavedOutcomes::load(dir.path()).unwrap().unwrap();
        assert_eq!(taken, saved);
        SavedOutcomes::taken(dir.path()).unwrap();
        assert!(
            SavedOutcomes::load(dir.path()).unwrap().is_none(),
            "taken once"
        );
        let new = OutcomeLog::default();
        new.push(outcome("h/new".into()));
        new.restore(taken);
        let first = 5_000;
        // The broker had the saved batch: it acknowledges it, and gets the rest.
        let (next, batch) = new.batch(Some(seq), first, 1 << 20);
        assert_eq!(next, first);
        let keys: Vec<&str> = batch.iter().map(|o| o.key.as_str()).collect();
        assert_eq!(keys, ["h/c", "h/new"]);

        // A broker that did not have it gets it again, under its number.
        let again = OutcomeLog::default();
        again.restore(saved.clone());
        assert_eq!(again.batch(Some(seq - 1), first, 1 << 20), (seq, sent));
    }

    #[test]
    fn an_empty_save_removes_the_file_and_an_unreadable_one_is_moved_aside() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(OUTCOMES_FILE);
        std::fs::write(&path, b"{\"queued\": 7}").unwrap();
        assert!(matches!(
            SavedOutcomes::load(dir.path()),
            Err(FileError::Format { .. })
        ));
        assert!(!path.exists());
        assert!(dir.path().join(format!("{OUTCOMES_FILE}.unread")).exists());
        let one = SavedOutcomes {
            sent: None,
            queued: vec![outcome("h/a".into())],
            lost: Vec::new(),
            saved_by: 1,
        };
        one.save(dir.path()).unwrap();
        assert!(path.exists());
        SavedOutcomes::default().save(dir.path()).unwrap();
        assert!(!path.exists());
    }

    /// A running process leaves its mark, naming it, until a graceful stop has saved its
    /// outcomes; a start after a crash tells the broker which process is lost, and every later
    /// process, stopped gracefully or not, goes on telling it (the broker may not have polled
    /// in between). A process that crashes after taking up saved outcomes loses their process
    /// too, also when it had removed the file.
    #[tokio::test]
    async fn a_crash_is_told_to_the_broker_and_carried_across_stops_and_crashes() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let crashed = || crashed_processes(dir, &SavedOutcomes::load(dir));
        // A start as the edge's: what was saved is restored, then the mark written.
        let start = || {
            let table = ShadowTable::default();
            for lost in crashed() {
                table.outcomes().lost(lost);
            }
            if let Some(saved) = SavedOutcomes::load(dir).unwrap() {
                table.outcomes().restore(saved);
            }
            RunningMark::of(table.outcomes()).write(dir).unwrap();
            SavedOutcomes::taken(dir).unwrap();
            table
        };
        let stop = |table: ShadowTable| async move {
            save_at_stop(&table, dir.into()).await.unwrap();
            table
        };
        stop(start()).await;
        assert!(!dir.join(RUNNING_FILE).exists());
        assert!(crashed().is_empty(), "stopped gracefully");

        // The next process crashes: its mark stays, and nothing is saved.
        let first = start().outcomes().boot_id();
        assert_eq!(crashed(), vec![first]);
        let second = start();
        assert_eq!(second.outcomes().lost_boots_to_tell(), vec![first]);
        // It stops gracefully with an outcome to report: the loss is saved with it.
        second.outcomes().push(outcome("h/a".into()));
        let second = stop(second).await;
        assert!(crashed().is_empty());
        let saved = SavedOutcomes::load(dir).unwrap().expect("saved");
        assert_eq!(saved.saved_by, second.outcomes().boot_id());
        assert_eq!(saved.lost, vec![first]);

        // The third takes that up and crashes before reporting it: both the third and the
        // second (whose outcome went with it) are lost, and the first is still told.
        let third = start().outcomes().boot_id();
        assert!(!dir.join(OUTCOMES_FILE).exists());
        let mut lost = crashed();
        lost.sort_unstable();
        let mut want = vec![first, second.outcomes().boot_id(), third];
        want.sort_unstable();
        assert_eq!(lost, want);

        // A mark over a file it did not save (taken up, not removed) is a crash too.
        let fourth = start().outcomes().boot_id();
        saved.save(dir).unwrap();
        assert!(crashed().contains(&fourth));
        std::fs::write(dir.join(OUTCOMES_FILE), b"{").unwrap();
        assert!(
            crashed().contains(&fourth),
            "unreadable outcomes are lost with it"
        );
        std::fs::write(dir.join(RUNNING_FILE), b"{").unwrap();
        assert!(crashed().is_empty(), "an unreadable mark names no process");
    }

    /// A stop that a fill outlasted tells the broker, through the next process, that its own
    /// orders' unreported outcomes are lost, once the broker has every outcome the stop saved
    /// (those may be of its orders too, and would be priced twice); the stopping process
    /// itself never tells it.
    #[tokio::test]
    async fn a_fill_cut_short_by_the_stop_is_told_lost_after_the_saved_outcomes() {
        let tmp = tempfile::tempdir().unwrap();
        let table = std::sync::Arc::new(ShadowTable::default());
        for k in ["h/a", "h/b"] {
            table.outcomes().push(outcome(k.into()));
        }
        let _cut_short = table.begin_fill("h/filling", Instant::now());
        save_at_stop(&table, tmp.path().into()).await.unwrap();
        assert!(table.outcomes().lost_boots_to_tell().is_empty());
        let saved = SavedOutcomes::load(tmp.path()).unwrap().unwrap();
        let stopped = table.outcomes().boot_id();
        assert_eq!(saved.lost, vec![stopped]);

        let next = OutcomeLog::default();
        next.restore(saved);
        assert!(next.lost_boots_to_tell().is_empty());
        let first = 9_000;
        let (seq, batch) = next.batch(Some(0), first, 300);
        assert_eq!(batch.len(), 1, "a batch at a time");
        assert!(next.lost_boots_to_tell().is_empty(), "not acknowledged");
        let (seq, batch) = next.batch(Some(seq), first, 1 << 20);
        assert_eq!(batch.len(), 1);
        assert!(next.lost_boots_to_tell().is_empty());
        assert_eq!(next.batch(Some(seq), first, 1 << 20), (0, vec![]));
        assert_eq!(
            next.lost_boots_to_tell(),
            vec![stopped],
            "told once the broker has them"
        );
    }

    /// Outcomes a process restored and saved again before the broker had them name their own
    /// process as lost in the next file, so a crash after that still names it (told only
    /// once they are in, so nothing is priced twice).
    #[tokio::test]
    async fn outcomes_handed_on_again_name_their_process() {
        let tmp = tempfile::tempdir().unwrap();
        let first = ShadowTable::default();
        first.outcomes().push(outcome("h/a".into()));
        save_at_stop(&first, tmp.path().into()).await.unwrap();
        let second = ShadowTable::default();
        second
            .outcomes()
            .restore(SavedOutcomes::load(tmp.path()).unwrap().unwrap());
        save_at_stop(&second, tmp.path().into()).await.unwrap();
        let saved = SavedOutcomes::load(tmp.path()).unwrap().unwrap();
        assert_eq!(saved.lost, vec![first.outcomes().boot_id()]);
        assert_eq!(saved.len(), 1);

        let third = OutcomeLog::default();
        third.restore(saved);
        assert!(third.lost_boots_to_tell().is_empty());
        let (seq, _) = third.batch(Some(0), 50, 1 << 20);
        assert_eq!(third.batch(Some(seq), 50, 1 << 20), (0, vec![]));
        assert_eq!(third.lost_boots_to_tell(), vec![first.outcomes().boot_id()]);
    }

    /// Restored outcomes the log's bound drops count as gone, or the loss would wait for
    /// acknowledgements that never come.
    #[test]
    fn restored_outcomes_dropped_at_the_bound_do_not_hold_back_a_loss() {
        let saved = SavedOutcomes {
            sent: None,
            queued: (0..OutcomeLog::CAPACITY + 5)
                .map(|i| outcome(format!("h/{i}")))
                .collect(),
            lost: vec![7],
            saved_by: 1,
        };
        let next = OutcomeLog::default();
        next.restore(saved);
        assert_eq!(next.dropped(), 5);
        let mut ack = Some(0);
        loop {
            let (seq, batch) = next.batch(ack, 100, 1 << 20);
            if batch.is_empty() {
                break;
            }
            ack = Some(seq);
        }
        assert_eq!(next.lost_boots_to_tell(), vec![7]);
    }

    fn outcome(key: String) -> ShadowOutcome {
        ShadowOutcome {
            key,
            bytes: 1,
            hits: 0,
            held_secs: 1,
            peer_filled: false,
            evicted: false,
            failed: false,
            held_before: false,
            removed: false,
            ended_ms: 0,
            head_start_ms: None,
            order: None,
            fill_paid: false,
        }
    }

    #[test]
    fn a_backlog_drains_oldest_first_in_replies_that_fit_a_frame() {
        use crate::sync::protocol::MAX_FRAME;
        let log = OutcomeLog::default();
        for i in 0..OutcomeLog::CAPACITY {
            log.push(outcome(format!("h/{i:05}/{}", "x".repeat(100))));
        }
        let mut seen = 0;
        while seen < OutcomeLog::CAPACITY {
            let batch = log.drain_within(MAX_FRAME / 2);
            assert!(!batch.is_empty());
            assert!(
                batch[0].key.starts_with(&format!("h/{seen:05}/")),
                "oldest first"
            );
            let encoded = serde_json::to_vec(&batch).unwrap().len();
            assert!(encoded < MAX_FRAME / 2, "{encoded} bytes");
            seen += batch.len();
        }
        assert_eq!(seen, OutcomeLog::CAPACITY);
        assert!(log.drain_within(MAX_FRAME / 2).is_empty());
    }
}
