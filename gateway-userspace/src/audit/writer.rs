//! The writer: one task owns the open segment; appends from any number of
//! tasks are sequenced, hashed, written and made durable in groups.
//!
//! Fails closed: an append returns `Ok` only once its record is durable (per
//! [`Durability`]); if the record cannot be written the append returns an error
//! and the caller must deny what it wanted to log. A write failure is a
//! `tracing` error and a counter (`AuditStats::log_failures`), the partial
//! write is cut off again, and a `log.failure` record goes into the log ahead
//! of the next record that can be written (tried every second).
//!
//! Group commit: the writer takes one message, drains whatever else is queued
//! (up to [`MAX_BATCH`]), encodes them all into one buffer, writes it with one
//! `pwrite` and (strict, or when due) one `fdatasync`, then answers every
//! waiter. While one fsync runs, the next group queues up, so throughput grows
//! with concurrency. In strict mode the writer has its own thread and syncs
//! inline; in batched mode it is a task on the daemon's runtime and the
//! periodic fsync runs in the blocking pool while the writer goes on writing:
//! appends never wait for it. What was written before an fsync began is
//! durable when it ends; anything written meanwhile waits for the next one.
//!
//! Strict mode, one waiter: an append that finds no other append waiting,
//! nothing queued and the writer idle stages its record when called (so the
//! order of the calls holds) and writes and syncs the group on its own thread
//! when awaited, saving the two thread wake-ups of a hand-off to the writer
//! thread and back. Detached records are staged the same way when the writer
//! is idle. A staged record whose append is dropped before it ran is written
//! by the writer thread within `batch_interval_ms`, like any held record.
//!
//! Crash safety: a kill at any moment leaves at most a torn last line. Open
//! runs the verifier's pass from the last saved checkpoint (`resume.json`, see
//! `verify`) or, when that does not fit, over the whole log, moves a torn last line into
//! `quarantine/` (never dropping it), cuts it off, records `log.recovered`,
//! and continues the chain from the last good record. A log that fails any
//! other check is refused: appending to a log the gateway cannot vouch for
//! would hide the damage.

use std::{
    fs::{self, File},
    os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt},
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::Duration,
};

use ed25519_dalek::SigningKey;
use serde_json::json;
use time::OffsetDateTime;
use tokio::{
    sync::{mpsc, oneshot},
    time::{Instant, MissedTickBehavior},
};

use super::{
    AuditError,
    checkpoint::{self, Checkpoint, KEY_FILE, KeyRotation},
    config::{AuditConfig, Durability},
    merkle::Frontier,
    record::{self, EncodeError, Hash, Kind, MAX_LINE_BYTES, NewRecord, now_rfc3339},
    segment::{self, ANCHOR_FILE, Anchor, LOCK_FILE, QUARANTINE_DIR, SegmentFile, segment_name},
    sink::{self, Sinks},
    spool,
    verify::{RESUME_FILE, Resume, ScanOptions, ScanState, SegmentState, scan},
};

/// Most messages folded into one write.
pub const MAX_BATCH: usize = 4096;
const HOUSEKEEPING: Duration = Duration::from_secs(1);
/// At most this much of detached records is held back before it is written.
const HOLD_MAX_BYTES: usize = 64 * 1024;

/// An acknowledged append.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    pub hash: Hash,
}

/// What `retain` deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetentionReport {
    pub deleted_segments: Vec<PathBuf>,
    /// Seqs `first..last_plus_one` were deleted.
    pub first_seq: u64,
    pub last_plus_one: u64,
}

/// Counters (monotonic since open).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct AuditStats {
    pub appends: u64,
    pub batches: u64,
    pub fsyncs: u64,
    /// Time spent in `fdatasync`, all of them, and the longest one.
    pub fsync_micros_total: u64,
    pub fsync_micros_max: u64,
    /// Failed writes (each refused the appends it carried).
    pub log_failures: u64,
    /// The last write failed and none has succeeded since: appends are
    /// refused (what they would record is denied).
    pub failing: bool,
    /// Checkpoints that could not be exported to a sink.
    pub sink_failures: u64,
    pub checkpoints: u64,
    /// Statement records appended before the statement's outcome (those
    /// with a decision and no result), by the decision's verdict.
    pub statements: StatementStats,
    /// `approval.requested` records: commands held for approval.
    pub approval_requests: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StatementStats {
    pub allow: u64,
    pub deny: u64,
    pub require_approval: u64,
    pub other: u64,
}

#[derive(Default)]
struct Stats {
    appends: AtomicU64,
    batches: AtomicU64,
    fsyncs: AtomicU64,
    fsync_micros_total: AtomicU64,
    fsync_micros_max: AtomicU64,
    log_failures: AtomicU64,
    failing: AtomicBool,
    sink_failures: AtomicU64,
    checkpoints: AtomicU64,
    /// allow, deny, `require_approval`, other.
    statements: [AtomicU64; 4],
    approval_requests: AtomicU64,
}

fn bump(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

impl Stats {
    /// Counts a statement's decision record (see [`AuditStats::statements`]).
    fn count(&self, rec: &NewRecord) {
        if rec.kind == Kind::ApprovalRequested {
            bump(&self.approval_requests);
        }
        if rec.kind != Kind::Statement || rec.result.is_some() {
            return;
        }
        let Some(verdict) = rec.decision.as_ref().and_then(|d| d.get("verdict")) else {
            return;
        };
        let i = match verdict.as_str() {
            Some("allow") => 0,
            Some("deny") => 1,
            Some("require_approval") => 2,
            _ => 3,
        };
        bump(&self.statements[i]);
    }

    fn synced(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        bump(&self.fsyncs);
        self.fsync_micros_total.fetch_add(us, Ordering::Relaxed);
        self.fsync_micros_max.fetch_max(us, Ordering::Relaxed);
    }
}

type Reply<T> = oneshot::Sender<Result<T, AuditError>>;
type AnswerRx = oneshot::Receiver<Result<Appended, AuditError>>;
type Sender = mpsc::UnboundedSender<Msg>;

enum Msg {
    /// `None`: detached, nobody waits (see [`AuditLog::append_detached`]).
    Append(Box<NewRecord>, Option<Reply<Appended>>),
    Checkpoint(Reply<Checkpoint>),
    RotateKey(Reply<String>),
    Retain(OffsetDateTime, Reply<RetentionReport>),
    Close(Reply<()>),
    /// Write the held group now (an append that staged its record asks for
    /// this when the commit would rotate the segment).
    Flush,
}

/// Handle to the audit log. Cheap to clone; every clone appends to the same writer.
#[derive(Clone)]
pub struct AuditLog {
    inner: Arc<Inner>,
}

struct Inner {
    /// Unbounded, so that every append is queued in the order it was made,
    /// detached or not. Its producers bound it: an awaited append waits for
    /// its answer, and a Postgres connection keeps at most
    /// `MAX_UNCONFIRMED` reads in flight, each with one detached result.
    tx: mpsc::UnboundedSender<Msg>,
    shared: Arc<Shared>,
    stats: Arc<Stats>,
    dir: PathBuf,
    durability: Durability,
    retain_days: Option<u32>,
}

/// The writer's state, and what an append needs to know to stage its record
/// itself.
struct Shared {
    writer: tokio::sync::Mutex<Writer>,
    /// Messages sent on the queue and not yet handled (staged) by the writer
    /// loop. An append stages its record itself only when this is 0, so the
    /// log keeps the order of the calls.
    queued: AtomicUsize,
    /// Awaited appends not yet answered.
    waiting: AtomicUsize,
    /// Strict durability: an append that finds no other append waiting and
    /// the writer idle stages its record and writes and syncs it on the
    /// calling thread, instead of handing it to the writer thread and back
    /// (two thread wake-ups per statement at one client). Under concurrency
    /// appends go to the writer thread, which commits them in groups.
    inline: bool,
}

/// Counts an awaited append until it is answered or dropped.
struct Waiting(Arc<Shared>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("dir", &self.inner.dir)
            .finish_non_exhaustive()
    }
}

pub(crate) fn io_err(
    path: &Path,
    op: &'static str,
) -> impl FnOnce(std::io::Error) -> AuditError + use<> {
    let path = path.to_path_buf();
    move |e| AuditError::Io {
        path,
        op,
        source: Arc::new(e),
    }
}

impl AuditLog {
    /// Opens (or creates) the log for the daemon: verifies it, recovers a torn
    /// tail, makes the signing key at first start, and starts the writer task.
    /// Must be called inside a tokio runtime.
    pub async fn open(cfg: AuditConfig) -> Result<AuditLog, AuditError> {
        Self::open_inner(cfg, true).await
    }

    /// Opens an existing, intact log to append a few records (the CLI's
    /// `audit.access`): never creates the log or a key and never repairs a torn
    /// tail (`NeedsRepair`); `Locked` while the daemon holds the writer lock.
    pub async fn open_for_reader(cfg: AuditConfig) -> Result<AuditLog, AuditError> {
        Self::open_inner(cfg, false).await
    }

    async fn open_inner(cfg: AuditConfig, repair: bool) -> Result<AuditLog, AuditError> {
        cfg.validate()?;
        let dir = cfg.dir.clone();
        let blocking_cfg = cfg.clone();
        let opened = tokio::task::spawn_blocking(move || open_blocking(&blocking_cfg, repair))
            .await
            .map_err(|e| AuditError::Internal {
                reason: format!("open task: {e}"),
            })??;
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Stats::default());
        let sink_tx = spawn_sinks(&cfg, &stats)?;
        let recovered = opened.recovered.clone();
        let durability = cfg.durability;
        let retain_days = cfg.retain_days;
        let strict = durability == Durability::Strict;
        let mut writer = Writer::new(cfg, opened, Arc::clone(&stats), sink_tx);
        // Strict: every awaited group waits for an fdatasync, which the
        // writer does inline, on its own thread, or on the thread of an
        // append that commits its record itself (see `Shared::inline`).
        // Handing each sync to the blocking pool would cost two more thread
        // hand-offs (measured: ~30% of the statement rate at one client).
        writer.own_thread = strict;
        let shared = Arc::new(Shared {
            writer: tokio::sync::Mutex::new(writer),
            queued: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            inline: strict,
        });
        let loop_shared = Arc::clone(&shared);
        if strict {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| AuditError::Internal {
                    reason: format!("audit writer runtime: {e}"),
                })?;
            std::thread::Builder::new()
                .name("agentgate-audit".into())
                .spawn(move || runtime.block_on(run(loop_shared, rx)))
                .map_err(|e| AuditError::Internal {
                    reason: format!("audit writer thread: {e}"),
                })?;
        } else {
            tokio::spawn(run(loop_shared, rx));
        }
        let log = AuditLog {
            inner: Arc::new(Inner {
                tx,
                shared,
                stats,
                dir,
                durability,
                retain_days,
            }),
        };
        if let Some(result) = recovered {
            tracing::warn!(?result, "audit log: torn tail quarantined");
            log.append_any(NewRecord::new(Kind::LogRecovered).result(result))
                .await?;
        }
        Ok(log)
    }

    /// When an append counts as done.
    pub fn durability(&self) -> Durability {
        self.inner.durability
    }

    /// `[audit] retain_days`: applied by the daemon ([`super::enforce_retention`]).
    pub fn retain_days(&self) -> Option<u32> {
        self.inner.retain_days
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Appends a record; returns once it is durable. Reserved kinds
    /// (checkpoint, key.rotation, retention, log.failure, log.recovered) are
    /// written by the log itself and refused here.
    ///
    /// The record is queued when `append` is called, not when the future is
    /// first polled, so records are in the log in the order of the calls
    /// (with `append_detached` too).
    pub fn append(
        &self,
        rec: NewRecord,
    ) -> impl Future<Output = Result<Appended, AuditError>> + Send + 'static {
        let reserved = rec.kind.is_reserved().then_some(rec.kind);
        self.inner.stats.count(&rec);
        let queued = match reserved {
            Some(kind) => Err(AuditError::ReservedKind { kind }),
            None => self.queue(rec),
        };
        Self::answer(queued)
    }

    /// [`AuditLog::append`] for any kind (the log's own records).
    fn append_any(
        &self,
        rec: NewRecord,
    ) -> impl Future<Output = Result<Appended, AuditError>> + Send + 'static {
        Self::answer(self.queue(rec))
    }

    /// The answer to a queued append; commits it first if the call staged it.
    /// (`waiting` counts the append until this returns or is dropped.)
    async fn answer(
        queued: Result<(AnswerRx, Waiting, Option<Sender>), AuditError>,
    ) -> Result<Appended, AuditError> {
        let (rx, waiting, staged) = queued?;
        if let Some(tx) = staged {
            // Write (and sync) it here, unless the writer loop has done so
            // with a group meanwhile, or is busy: then it is asked to. Never
            // wait for the lock: the mutex is fair, so a waiting append owns
            // it from the moment it is released until it is polled again, and
            // a caller that awaits another append before polling this one
            // (a connection with a read in flight that meets a write) would
            // hold the writer up for good. Not with a segment rotation
            // either: this future may be dropped at any await, and a rotation
            // must not stop halfway, so the writer loop does that commit.
            let shared = &waiting.0;
            match shared.writer.try_lock() {
                Ok(mut w) if w.held.is_some() && !w.rotation_due() => {
                    // In strict mode this does not suspend (the writer syncs
                    // inline and no rotation is due), so the lock is released
                    // within this poll.
                    let _ = w
                        .commit(Vec::new(), Vec::new(), false, Hold::WriteNow)
                        .await;
                }
                Ok(w) if w.held.is_none() => {}
                _ => {
                    shared.queued.fetch_add(1, Ordering::AcqRel);
                    if tx.send(Msg::Flush).is_err() {
                        shared.queued.fetch_sub(1, Ordering::AcqRel);
                    }
                }
            }
        }
        rx.await.map_err(|_| AuditError::Closed)?
    }

    /// Queues an awaited append of any kind; the receiver gets its answer.
    /// With `Shared::inline`, a sole waiter that finds the writer idle stages
    /// the record at once instead (then the caller commits it, or asks the
    /// writer loop to, on the queue it is given).
    fn queue(&self, rec: NewRecord) -> Result<(AnswerRx, Waiting, Option<Sender>), AuditError> {
        let (tx, rx) = oneshot::channel();
        let shared = &self.inner.shared;
        let alone = shared.waiting.fetch_add(1, Ordering::AcqRel) == 0;
        let waiting = Waiting(Arc::clone(shared));
        let msg = if alone && shared.inline {
            match self.try_stage(rec, Some(tx)) {
                Ok(()) => return Ok((rx, waiting, Some(self.inner.tx.clone()))),
                Err(msg) => msg,
            }
        } else {
            Msg::Append(Box::new(rec), Some(tx))
        };
        self.send(msg)?;
        Ok((rx, waiting, None))
    }

    /// Stages an append into the writer's held group from the caller, when
    /// nothing queued is waiting to be staged before it and the writer is not
    /// busy; gives the message back otherwise.
    fn try_stage(&self, rec: NewRecord, reply: Option<Reply<Appended>>) -> Result<(), Msg> {
        let shared = &self.inner.shared;
        let Ok(mut w) = shared.writer.try_lock() else {
            return Err(Msg::Append(Box::new(rec), reply));
        };
        // Under the lock: the loop handles (and uncounts) messages only
        // while holding it.
        if shared.queued.load(Ordering::Acquire) != 0 {
            return Err(Msg::Append(Box::new(rec), reply));
        }
        w.try_hold(Box::new(rec), reply)
    }

    /// Queues a record nobody waits for: it is sequenced in order with the
    /// other appends, held back, and written and made durable with the next
    /// group that someone waits for, or within `batch_interval_ms`, in either
    /// durability mode (a result record costs no write of its own). For facts that
    /// follow an already-recorded action (a statement's result after its
    /// write-ahead record): the caller does not block on them. `Err` only when
    /// the log is closed or the record is a reserved kind; a later write
    /// failure is counted and logged like any other.
    pub fn append_detached(&self, rec: NewRecord) -> Result<(), AuditError> {
        if rec.kind.is_reserved() {
            return Err(AuditError::ReservedKind { kind: rec.kind });
        }
        self.inner.stats.count(&rec);
        let msg = if self.inner.shared.inline {
            match self.try_stage(rec, None) {
                Ok(()) => return Ok(()),
                Err(msg) => msg,
            }
        } else {
            Msg::Append(Box::new(rec), None)
        };
        self.send(msg)
    }

    /// Writes a signed checkpoint now and returns it once durable (it is also
    /// handed to the external sinks).
    pub async fn checkpoint(&self) -> Result<Checkpoint, AuditError> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Checkpoint(tx))?;
        rx.await.map_err(|_| AuditError::Closed)?
    }

    /// Replaces the signing key: a `key.rotation` record signed by both keys,
    /// then a checkpoint under the new key. Returns the new public key (hex).
    pub async fn rotate_key(&self) -> Result<String, AuditError> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::RotateKey(tx))?;
        rx.await.map_err(|_| AuditError::Closed)?
    }

    /// Deletes closed segments whose records all precede `keep_after` and are
    /// covered by a checkpoint in the log; records a `retention` record first.
    /// Never called by the log itself.
    pub async fn retain(&self, keep_after: OffsetDateTime) -> Result<RetentionReport, AuditError> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Retain(keep_after, tx))?;
        rx.await.map_err(|_| AuditError::Closed)?
    }

    /// Flushes, writes a final checkpoint and stops the writer (for every clone).
    pub async fn close(self) -> Result<(), AuditError> {
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Close(tx))?;
        rx.await.map_err(|_| AuditError::Closed)?
    }

    pub fn stats(&self) -> AuditStats {
        let s = &self.inner.stats;
        AuditStats {
            appends: s.appends.load(Ordering::Relaxed),
            batches: s.batches.load(Ordering::Relaxed),
            fsyncs: s.fsyncs.load(Ordering::Relaxed),
            fsync_micros_total: s.fsync_micros_total.load(Ordering::Relaxed),
            fsync_micros_max: s.fsync_micros_max.load(Ordering::Relaxed),
            log_failures: s.log_failures.load(Ordering::Relaxed),
            failing: s.failing.load(Ordering::Relaxed),
            sink_failures: s.sink_failures.load(Ordering::Relaxed),
            checkpoints: s.checkpoints.load(Ordering::Relaxed),
            statements: StatementStats {
                allow: s.statements[0].load(Ordering::Relaxed),
                deny: s.statements[1].load(Ordering::Relaxed),
                require_approval: s.statements[2].load(Ordering::Relaxed),
                other: s.statements[3].load(Ordering::Relaxed),
            },
            approval_requests: s.approval_requests.load(Ordering::Relaxed),
        }
    }

    /// Queues `msg` at once: the queue's order is the order of the calls.
    fn send(&self, msg: Msg) -> Result<(), AuditError> {
        let queued = &self.inner.shared.queued;
        queued.fetch_add(1, Ordering::AcqRel);
        self.inner.tx.send(msg).map_err(|_| {
            queued.fetch_sub(1, Ordering::AcqRel);
            AuditError::Closed
        })
    }
}

fn spawn_sinks(
    cfg: &AuditConfig,
    stats: &Arc<Stats>,
) -> Result<Option<mpsc::UnboundedSender<Checkpoint>>, AuditError> {
    let sinks = Sinks {
        file: cfg.checkpoint_file.clone(),
        webhook: cfg
            .checkpoint_webhook
            .as_deref()
            .map(sink::parse_http_url)
            .transpose()
            .map_err(|reason| AuditError::Config { reason })?,
    };
    if sinks.is_empty() {
        return Ok(None);
    }
    let (tx, mut rx) = mpsc::unbounded_channel::<Checkpoint>();
    let stats = Arc::clone(stats);
    tokio::spawn(async move {
        while let Some(cp) = rx.recv().await {
            if let Some(path) = sinks.file.clone() {
                let c = cp.clone();
                let res = tokio::task::spawn_blocking(move || sink::write_file(&path, &c)).await;
                if !matches!(res, Ok(Ok(()))) {
                    bump(&stats.sink_failures);
                    tracing::error!(size = cp.size, error = ?res, "audit checkpoint: file sink failed");
                }
            }
            if let Some(url) = &sinks.webhook
                && let Err(error) = sink::post(url, &cp).await
            {
                bump(&stats.sink_failures);
                tracing::error!(size = cp.size, %error, "audit checkpoint: webhook failed");
            }
        }
    });
    Ok(Some(tx))
}

/// What opening found, handed to the writer task.
struct Opened {
    lock: File,
    scan: ScanState,
    key: SigningKey,
    key_dir: PathBuf,
    seg: OpenSegment,
    recovered: Option<serde_json::Value>,
}

struct OpenSegment {
    path: PathBuf,
    file: Arc<File>,
    first_seq: u64,
    len: u64,
    opened_at: OffsetDateTime,
    /// A failed write may have left bytes past `len`.
    tail_dirty: bool,
    /// Merkle frontier and prev hash before the segment's first record: the
    /// retention anchor if everything before this segment is deleted.
    frontier_at_start: Frontier,
    prev_at_start: Hash,
    first_time: Option<String>,
}

/// The pass at open: from the saved resume point when there is one that fits
/// (start-up time then depends on what was written since the last
/// checkpoint, not on the log's size), else over the whole log.
fn scan_for_open(dir: &Path) -> Result<ScanState, AuditError> {
    let full = |why: Option<String>| {
        if let Some(why) = why {
            tracing::warn!(reason = %why, "audit log: not resuming at the saved checkpoint; verifying the whole log");
        }
        scan(
            dir,
            &ScanOptions {
                allow_torn_tail: true,
                older: &[],
                resume: None,
            },
            |_, _, _, _| {},
        )
        .map_err(|f| AuditError::Tampered {
            dir: dir.to_path_buf(),
            failure: Box::new(f),
        })
    };
    let path = dir.join(RESUME_FILE);
    let resume: Resume = match fs::read(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return full(None),
        Err(e) => return full(Some(format!("cannot read {}: {e}", path.display()))),
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(r) => r,
            Err(e) => return full(Some(format!("{}: {e}", path.display()))),
        },
    };
    let opts = ScanOptions {
        allow_torn_tail: true,
        older: &[],
        resume: Some(&resume),
    };
    match scan(dir, &opts, |_, _, _, _| {}) {
        Ok(st) => {
            tracing::info!(
                checkpoint = resume.seq,
                records = st.next_seq,
                "audit log: verified from the last checkpoint on (`agentgate audit verify` checks all of it)"
            );
            Ok(st)
        }
        Err(f) => full(Some(f.to_string())),
    }
}

fn open_blocking(cfg: &AuditConfig, repair: bool) -> Result<Opened, AuditError> {
    let dir = cfg.dir.as_path();
    if repair {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_err(dir, "create log dir"))?;
    } else if !dir.is_dir() {
        return Err(AuditError::NeedsRepair {
            dir: dir.to_path_buf(),
            reason: "no audit log here".into(),
        });
    }
    let lock_path = dir.join(LOCK_FILE);
    let lock = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(io_err(&lock_path, "open lock file"))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(fs::TryLockError::WouldBlock) => {
            return Err(AuditError::Locked {
                dir: dir.to_path_buf(),
            });
        }
        Err(fs::TryLockError::Error(e)) => return Err(io_err(&lock_path, "lock")(e)),
    }
    let scan = scan_for_open(dir)?;

    let key_dir = cfg.key_dir();
    let (key, created) = match checkpoint::load_or_create_key(&key_dir, repair) {
        Ok(k) => k,
        Err(AuditError::Io { source, .. })
            if !repair && source.kind() == std::io::ErrorKind::NotFound =>
        {
            return Err(AuditError::NeedsRepair {
                dir: dir.to_path_buf(),
                reason: "no signing key".into(),
            });
        }
        Err(e) => return Err(e),
    };
    let key = finish_interrupted_rotation(&key_dir, key, scan.current_key(), repair)?;
    let pub_hex = hex::encode(key.verifying_key().as_bytes());
    if let Some(log_key) = scan.current_key()
        && log_key != pub_hex
    {
        return Err(AuditError::KeyMismatch {
            path: key_dir.join(KEY_FILE),
            log_key: log_key.to_owned(),
        });
    }
    if created {
        tracing::info!(key = %pub_hex, "audit log: made a new signing key");
    }
    checkpoint::export_public_key(dir, &key)?;

    let mut recovered = None;
    if let Some(torn) = &scan.torn_tail {
        if !repair {
            return Err(AuditError::NeedsRepair {
                dir: dir.to_path_buf(),
                reason: "torn last line".into(),
            });
        }
        recovered = Some(quarantine(dir, &torn.segment, torn.offset)?);
    }
    let seg = match scan.segments.last() {
        Some(last) => reopen_segment(last)?,
        None if repair => create_segment(dir, scan.next_seq, scan.frontier.clone(), scan.prev)?,
        None => {
            return Err(AuditError::NeedsRepair {
                dir: dir.to_path_buf(),
                reason: "no segments".into(),
            });
        }
    };
    Ok(Opened {
        lock,
        scan,
        key,
        key_dir,
        seg,
        recovered,
    })
}

fn reopen_segment(last: &SegmentState) -> Result<OpenSegment, AuditError> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&last.file.path)
        .map_err(io_err(&last.file.path, "open segment"))?;
    let opened_at = last
        .first_time
        .as_deref()
        .and_then(record::parse_time)
        .unwrap_or_else(OffsetDateTime::now_utc);
    Ok(OpenSegment {
        path: last.file.path.clone(),
        file: Arc::new(file),
        first_seq: last.file.first_seq,
        len: last.valid_len,
        opened_at,
        tail_dirty: false,
        frontier_at_start: last.frontier_at_start.clone(),
        prev_at_start: last.prev_at_start,
        first_time: last.first_time.clone(),
    })
}

/// A rotation writes `KEY_FILE.next` before its records; if the log already
/// names the new key, install it, otherwise the rotation never happened.
fn finish_interrupted_rotation(
    key_dir: &Path,
    key: SigningKey,
    log_key: Option<&str>,
    repair: bool,
) -> Result<SigningKey, AuditError> {
    let next_path = key_dir.join(format!("{KEY_FILE}.next"));
    let Ok(text) = fs::read_to_string(&next_path) else {
        return Ok(key);
    };
    let mut seed = [0u8; 32];
    if hex::decode_to_slice(text.trim(), &mut seed).is_err() {
        return Ok(key);
    }
    let next = SigningKey::from_bytes(&seed);
    if log_key == Some(hex::encode(next.verifying_key().as_bytes()).as_str()) {
        if repair {
            checkpoint::replace_key(key_dir, &next)?;
            let _ = fs::remove_file(&next_path);
        }
        Ok(next)
    } else {
        if repair {
            let _ = fs::remove_file(&next_path);
        }
        Ok(key)
    }
}

fn create_segment(
    dir: &Path,
    first_seq: u64,
    frontier_at_start: Frontier,
    prev_at_start: Hash,
) -> Result<OpenSegment, AuditError> {
    let path = dir.join(segment_name(first_seq));
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(io_err(&path, "create segment"))?;
    let len = file
        .metadata()
        .map_err(io_err(&path, "stat segment"))?
        .len();
    if len != 0 {
        return Err(AuditError::Internal {
            reason: format!("{} exists and is not empty", path.display()),
        });
    }
    file.sync_all().map_err(io_err(&path, "fsync segment"))?;
    checkpoint::sync_dir(dir)?;
    Ok(OpenSegment {
        path,
        file: Arc::new(file),
        first_seq,
        len: 0,
        opened_at: OffsetDateTime::now_utc(),
        tail_dirty: false,
        frontier_at_start,
        prev_at_start,
        first_time: None,
    })
}

/// Moves `segment[offset..]` into `quarantine/` (fsynced) and cuts it off.
fn quarantine(dir: &Path, segment: &Path, offset: u64) -> Result<serde_json::Value, AuditError> {
    let raw = fs::read(segment).map_err(io_err(segment, "read torn tail"))?;
    let torn = &raw[(offset as usize).min(raw.len())..];
    let qdir = dir.join(QUARANTINE_DIR);
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&qdir)
        .map_err(io_err(&qdir, "create quarantine dir"))?;
    let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos();
    let qpath = qdir.join(segment::quarantine_name(segment, offset, nanos));
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&qpath)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, torn)?;
            f.sync_all()
        })
        .map_err(io_err(&qpath, "write quarantine"))?;
    checkpoint::sync_dir(&qdir)?;
    checkpoint::sync_dir(dir)?;
    let f = fs::OpenOptions::new()
        .write(true)
        .open(segment)
        .map_err(io_err(segment, "open segment"))?;
    f.set_len(offset)
        .and_then(|()| f.sync_all())
        .map_err(io_err(segment, "cut torn tail"))?;
    Ok(json!({
        "segment": segment.file_name().map(|n| n.to_string_lossy().into_owned()),
        "offset": offset,
        "quarantined_bytes": torn.len(),
        "quarantine_file": qpath.file_name().map(|n| n.to_string_lossy().into_owned()),
        "quarantine_blake3": hex::encode(blake3::hash(torn).as_bytes()),
    }))
}

/// A failure not yet recorded in the log.
struct PendingFailure {
    since: String,
    error: String,
    failed_batches: u64,
    failed_records: u64,
}

/// Records encoded but not yet written.
struct Staged {
    buf: Vec<u8>,
    next_seq: u64,
    prev: Hash,
    frontier: Frontier,
    since_checkpoint: u64,
    checkpoints: Vec<Checkpoint>,
    records: u64,
    /// The state before the group's last checkpoint record, and where in
    /// `buf` that record starts.
    resume: Option<(usize, u64, Hash, Frontier)>,
}

struct Writer {
    cfg: AuditConfig,
    /// The writer runs on its own thread and may block in `fdatasync`.
    own_thread: bool,
    host: String,
    origin: String,
    key: SigningKey,
    key_dir: PathBuf,
    seg: OpenSegment,
    closed_segments: Vec<SegmentState>,
    next_seq: u64,
    prev: Hash,
    frontier: Frontier,
    since_checkpoint: u64,
    last_checkpoint: Option<Checkpoint>,
    last_checkpoint_at: Instant,
    failure: Option<PendingFailure>,
    unsynced_since: Option<Instant>,
    stats: Arc<Stats>,
    sink_tx: Option<mpsc::UnboundedSender<Checkpoint>>,
    /// The writer lock (`flock` on `.lock`); released before `close` answers,
    /// so the log can be opened again as soon as `close` returns.
    lock: Option<File>,
    /// Detached records staged (sequenced and hashed) but not yet written:
    /// they ride with the next write, or go out on their own after
    /// `batch_interval_ms` (see [`Writer::commit`]).
    held: Option<Held>,
    /// `Close` was handled: nothing more is written.
    closed: bool,
}

/// A staged group not yet written: detached records, and (with
/// `Shared::inline`) records staged by their appends, which commit it.
struct Held {
    st: Staged,
    acks: Vec<(Appended, Option<Reply<Appended>>)>,
    since: Instant,
}

/// Whether [`Writer::commit`] may keep a group of detached records back.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hold {
    Allowed,
    WriteNow,
}

fn hostname() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown-host".into())
}

impl Writer {
    fn new(
        cfg: AuditConfig,
        o: Opened,
        stats: Arc<Stats>,
        sink_tx: Option<mpsc::UnboundedSender<Checkpoint>>,
    ) -> Writer {
        let host = cfg.host.clone().unwrap_or_else(hostname);
        let mut closed = o.scan.segments;
        if closed.last().is_some_and(|s| s.file.path == o.seg.path) {
            closed.pop();
        }
        Writer {
            origin: format!("agentgate/{host}"),
            host,
            key: o.key,
            key_dir: o.key_dir,
            seg: o.seg,
            closed_segments: closed,
            next_seq: o.scan.next_seq,
            prev: o.scan.prev,
            frontier: o.scan.frontier,
            since_checkpoint: o.scan.since_checkpoint,
            last_checkpoint: o.scan.last_checkpoint,
            last_checkpoint_at: Instant::now(),
            failure: None,
            unsynced_since: None,
            stats,
            sink_tx,
            lock: Some(o.lock),
            held: None,
            closed: false,
            own_thread: false,
            cfg,
        }
    }

    /// Stages `rec` into the held group now, without I/O, if `commit` would
    /// stage it the same way: no failure record or checkpoint due before it,
    /// the held group small, the log open. Gives it back otherwise.
    fn try_hold(&mut self, rec: Box<NewRecord>, reply: Option<Reply<Appended>>) -> Result<(), Msg> {
        let (size, since_checkpoint) = match &self.held {
            Some(h) => (h.st.buf.len(), h.st.since_checkpoint),
            None => (0, self.since_checkpoint),
        };
        if self.closed
            || self.failure.is_some()
            || size >= HOLD_MAX_BYTES
            || since_checkpoint + 1 >= self.cfg.checkpoint_every_records
        {
            return Err(Msg::Append(rec, reply));
        }
        let mut held = match self.held.take() {
            Some(h) => h,
            None => Held {
                st: self.stage_start(),
                acks: Vec::new(),
                since: Instant::now(),
            },
        };
        match self.stage(&mut held.st, &rec) {
            Ok(a) => held.acks.push((a, reply)),
            Err(e) => {
                if let Some(r) = reply {
                    let _ = r.send(Err(encode_error(e)));
                }
            }
        }
        if held.st.records > 0 {
            self.held = Some(held);
        }
        Ok(())
    }

    /// Handles one drained group in order; returns true after `Close`.
    async fn handle(&mut self, msgs: Vec<Msg>) -> bool {
        let mut appends: Vec<(NewRecord, Option<Reply<Appended>>)> = Vec::new();
        let mut cp_waiters: Vec<Reply<Checkpoint>> = Vec::new();
        for msg in msgs {
            match msg {
                Msg::Append(rec, reply) => appends.push((*rec, reply)),
                Msg::Checkpoint(reply) => cp_waiters.push(reply),
                control => {
                    if !appends.is_empty() || !cp_waiters.is_empty() {
                        let force = !cp_waiters.is_empty();
                        let _ = self
                            .commit(
                                std::mem::take(&mut appends),
                                std::mem::take(&mut cp_waiters),
                                force,
                                Hold::WriteNow,
                            )
                            .await;
                    }
                    if self.control(control).await {
                        return true;
                    }
                }
            }
        }
        if !appends.is_empty() || !cp_waiters.is_empty() {
            let force = !cp_waiters.is_empty();
            let _ = self.commit(appends, cp_waiters, force, Hold::Allowed).await;
        }
        false
    }

    /// Held as long as the interval allows: durable now.
    async fn flush_held(&mut self) {
        self.write_held().await;
        self.sync_now().await;
    }

    /// Writes held detached records, if any (before anything that reads or
    /// changes the writer's position: key rotation, retention, fsync).
    async fn write_held(&mut self) {
        if self.held.is_some() {
            let _ = self
                .commit(Vec::new(), Vec::new(), false, Hold::WriteNow)
                .await;
        }
    }

    async fn control(&mut self, msg: Msg) -> bool {
        self.write_held().await;
        match msg {
            Msg::RotateKey(reply) => {
                let r = self.rotate_key().await;
                let _ = reply.send(r);
            }
            Msg::Retain(keep_after, reply) => {
                let r = self.retain(keep_after).await;
                let _ = reply.send(r);
            }
            Msg::Close(reply) => {
                let r = self
                    .commit(Vec::new(), Vec::new(), true, Hold::WriteNow)
                    .await;
                self.lock = None;
                self.closed = true;
                let _ = reply.send(r);
                return true;
            }
            // Held records were written above.
            Msg::Flush => {}
            Msg::Append(..) | Msg::Checkpoint(_) => unreachable!("handled by the caller"),
        }
        false
    }

    async fn housekeeping(&mut self) {
        if self.failure.is_some() {
            // Try to record the failure now that time has passed.
            let _ = self
                .commit(Vec::new(), Vec::new(), false, Hold::WriteNow)
                .await;
        }
        if self.since_checkpoint > 0
            && self.last_checkpoint_at.elapsed()
                >= Duration::from_secs(self.cfg.checkpoint_every_secs)
        {
            let _ = self
                .commit(Vec::new(), Vec::new(), true, Hold::WriteNow)
                .await;
        }
        self.ingest_spool().await;
    }

    async fn ingest_spool(&mut self) {
        let dir = self.cfg.dir.clone();
        let taken = match tokio::task::spawn_blocking(move || spool::take(&dir)).await {
            Ok(Ok(t)) => t,
            Ok(Err(error)) => {
                tracing::error!(%error, "audit: cannot read the access-request spool");
                return;
            }
            Err(_) => return,
        };
        let Some((records, path)) = taken else { return };
        let n = records.len();
        let items = records.into_iter().map(|r| (r, None)).collect();
        if self
            .commit(items, Vec::new(), false, Hold::WriteNow)
            .await
            .is_ok()
        {
            self.sync_now().await;
            if let Err(error) = fs::remove_file(&path) {
                tracing::error!(%error, path = %path.display(), "audit: cannot remove the ingested spool");
            }
            tracing::info!(requests = n, "audit: ingested spooled access requests");
        }
    }

    fn stage_start(&self) -> Staged {
        Staged {
            buf: Vec::with_capacity(4096),
            next_seq: self.next_seq,
            prev: self.prev,
            frontier: self.frontier.clone(),
            since_checkpoint: self.since_checkpoint,
            checkpoints: Vec::new(),
            records: 0,
            resume: None,
        }
    }

    fn stage(&self, st: &mut Staged, rec: &NewRecord) -> Result<Appended, EncodeError> {
        let time = now_rfc3339();
        let hash = record::encode_line(rec, st.next_seq, &time, &self.host, &st.prev, &mut st.buf)?;
        let seq = st.next_seq;
        st.frontier.push(&hash);
        st.prev = hash;
        st.next_seq += 1;
        st.records += 1;
        if rec.kind == Kind::Checkpoint {
            st.since_checkpoint = 0;
        } else {
            st.since_checkpoint += 1;
        }
        Ok(Appended { seq, hash })
    }

    fn stage_checkpoint(&self, st: &mut Staged) {
        st.resume = Some((st.buf.len(), st.next_seq, st.prev, st.frontier.clone()));
        let cp = Checkpoint::sign(
            &self.key,
            &self.origin,
            st.next_seq,
            &st.frontier.root(),
            &st.prev,
            now_rfc3339(),
        );
        let rec = NewRecord::new(Kind::Checkpoint)
            .result(serde_json::to_value(&cp).expect("checkpoint serializes"));
        self.stage(st, &rec).expect("a checkpoint record is small");
        st.checkpoints.push(cp);
    }

    /// Stages, writes and acknowledges one group, after any held records.
    /// `Err` when nothing was written.
    ///
    /// With `Hold::Allowed`, a group of detached records alone (nobody waits,
    /// no checkpoint, no fsync due) is kept back, staged, and written with the
    /// next group: a result record then costs no write of its own. Held
    /// records are sequenced already, so the log's order is the order of the
    /// appends; they wait at most `batch_interval_ms` (see `run`).
    async fn commit(
        &mut self,
        appends: Vec<(NewRecord, Option<Reply<Appended>>)>,
        cp_waiters: Vec<Reply<Checkpoint>>,
        force_checkpoint: bool,
        hold: Hold,
    ) -> Result<(), AuditError> {
        if let Err(e) = self.rotate_if_due().await {
            self.note_failure(&e, appends.len() as u64);
            for (_, reply) in appends {
                if let Some(r) = reply {
                    let _ = r.send(Err(e.clone()));
                }
            }
            for r in cp_waiters {
                let _ = r.send(Err(e.clone()));
            }
            return Err(e);
        }
        let (mut st, mut acks, held_since) = match self.held.take() {
            Some(h) => (h.st, h.acks, Some(h.since)),
            None => (self.stage_start(), Vec::with_capacity(appends.len()), None),
        };
        if let Some(f) = &self.failure {
            let rec = NewRecord::new(Kind::LogFailure).result(json!({
                "since": f.since, "error": f.error,
                "failed_batches": f.failed_batches, "failed_records": f.failed_records,
            }));
            self.stage(&mut st, &rec)
                .expect("a failure record is small");
        }
        for (rec, reply) in appends {
            match self.stage(&mut st, &rec) {
                Ok(a) => acks.push((a, reply)),
                Err(e) => {
                    if let Some(r) = reply {
                        let _ = r.send(Err(encode_error(e)));
                    }
                    continue;
                }
            }
            if st.since_checkpoint >= self.cfg.checkpoint_every_records {
                self.stage_checkpoint(&mut st);
            }
        }
        let last_is_checkpoint = st
            .checkpoints
            .last()
            .is_some_and(|c| c.size + 1 == st.next_seq);
        if (force_checkpoint || !cp_waiters.is_empty()) && !last_is_checkpoint {
            self.stage_checkpoint(&mut st);
        }
        if st.records == 0 {
            return Ok(());
        }
        // Strict: a group fsyncs at once when someone waits for it; detached
        // records alone ride with the next group or the batch interval.
        let waited = acks.iter().any(|(_, reply)| reply.is_some());
        // Batched: the writer loop's timer starts the periodic fsync in the
        // background (`start_sync`); a commit does not wait for it.
        let sync = (self.cfg.durability == Durability::Strict && waited)
            || !st.checkpoints.is_empty()
            || (self.own_thread
                && self.unsynced_since.is_some_and(|t| {
                    t.elapsed() >= Duration::from_millis(self.cfg.batch_interval_ms)
                }));
        // (A checkpoint always syncs, so a held group never has one.)
        if hold == Hold::Allowed
            && !(waited || sync || self.failure.is_some() || st.buf.len() >= HOLD_MAX_BYTES)
        {
            self.held = Some(Held {
                st,
                acks,
                since: held_since.unwrap_or_else(Instant::now),
            });
            return Ok(());
        }
        let base = self.seg.len;
        match self.write(std::mem::take(&mut st.buf), sync).await {
            Ok(()) => {
                if let Some(point) = st.resume.take() {
                    // A group with a checkpoint is always fsynced (above).
                    self.save_resume(base, point);
                }
                self.committed(st, acks, cp_waiters);
                Ok(())
            }
            Err(e) => {
                self.note_failure(&e, acks.len() as u64);
                for (_, reply) in acks {
                    if let Some(r) = reply {
                        let _ = r.send(Err(e.clone()));
                    }
                }
                for r in cp_waiters {
                    let _ = r.send(Err(e.clone()));
                }
                Err(e)
            }
        }
    }

    /// Saves where the next open may start its pass: just before the durable
    /// checkpoint record at `offset` bytes into the group written at `base`.
    /// Best effort: without it the next open verifies the whole log.
    fn save_resume(&self, base: u64, (offset, seq, prev, frontier): (usize, u64, Hash, Frontier)) {
        let mut segments = self.closed_segments.clone();
        segments.push(SegmentState {
            file: SegmentFile {
                path: self.seg.path.clone(),
                first_seq: self.seg.first_seq,
            },
            valid_len: base + offset as u64,
            records: seq - self.seg.first_seq,
            frontier_at_start: self.seg.frontier_at_start.clone(),
            prev_at_start: self.seg.prev_at_start,
            first_time: self.seg.first_time.clone(),
            last_time: None,
        });
        let resume = Resume {
            v: Resume::VERSION,
            seq,
            prev,
            frontier,
            key: hex::encode(self.key.verifying_key().as_bytes()),
            segments,
        };
        let path = self.cfg.dir.join(RESUME_FILE);
        let tmp = self.cfg.dir.join(format!("{RESUME_FILE}.new"));
        let body = serde_json::to_vec(&resume).expect("resume point serializes");
        if let Err(error) = fs::write(&tmp, body).and_then(|()| fs::rename(&tmp, &path)) {
            tracing::warn!(%error, path = %path.display(), "audit: cannot save the resume point; the next start verifies the whole log");
        }
    }

    /// The group is on disk: advance the chain, answer the waiters, export checkpoints.
    fn committed(
        &mut self,
        st: Staged,
        acks: Vec<(Appended, Option<Reply<Appended>>)>,
        cp_waiters: Vec<Reply<Checkpoint>>,
    ) {
        self.next_seq = st.next_seq;
        self.prev = st.prev;
        self.frontier = st.frontier;
        self.since_checkpoint = st.since_checkpoint;
        if self.failure.take().is_some() {
            self.stats.failing.store(false, Ordering::Relaxed);
        }
        self.stats
            .appends
            .fetch_add(acks.len() as u64, Ordering::Relaxed);
        for (a, reply) in acks {
            if let Some(r) = reply {
                let _ = r.send(Ok(a));
            }
        }
        if let Some(cp) = st.checkpoints.last() {
            self.last_checkpoint = Some(cp.clone());
            self.last_checkpoint_at = Instant::now();
            for r in cp_waiters {
                let _ = r.send(Ok(cp.clone()));
            }
        }
        for cp in st.checkpoints {
            self.stats.checkpoints.fetch_add(1, Ordering::Relaxed);
            if let Some(tx) = &self.sink_tx {
                let _ = tx.send(cp);
            }
        }
    }

    fn note_failure(&mut self, e: &AuditError, records: u64) {
        bump(&self.stats.log_failures);
        self.stats.failing.store(true, Ordering::Relaxed);
        tracing::error!(error = %e, records, "audit log write failed; appends are refused until it can be written");
        let f = self.failure.get_or_insert_with(|| PendingFailure {
            since: now_rfc3339(),
            error: String::new(),
            failed_batches: 0,
            failed_records: 0,
        });
        f.error = e.to_string();
        f.failed_batches += 1;
        f.failed_records += records;
    }

    /// One positioned write of the whole group, then (if `sync`) one fdatasync.
    /// On failure the partial write is cut off again.
    async fn write(&mut self, buf: Vec<u8>, sync: bool) -> Result<(), AuditError> {
        let file = Arc::clone(&self.seg.file);
        let path = self.seg.path.clone();
        let at = self.seg.len;
        let dirty = self.seg.tail_dirty;
        let n = buf.len() as u64;
        let io = move || {
            let r = (|| {
                file.write_all_at(&buf, at)
                    .map_err(io_err(&path, "write"))?;
                if dirty {
                    file.set_len(at + n)
                        .map_err(io_err(&path, "cut stale tail"))?;
                }
                if !sync {
                    return Ok(None);
                }
                let t = std::time::Instant::now();
                file.sync_data().map_err(io_err(&path, "fdatasync"))?;
                Ok(Some(t.elapsed()))
            })();
            let cut = r.is_err() && file.set_len(at).is_ok();
            (r, cut)
        };
        // A write into the page cache takes microseconds: handing it to the
        // blocking pool would cost more (two thread hand-offs) than it saves.
        // Only an fdatasync leaves the shared runtime's threads.
        let res = if sync && !self.own_thread {
            tokio::task::spawn_blocking(io)
                .await
                .map_err(|e| AuditError::Internal {
                    reason: format!("write task: {e}"),
                })?
        } else {
            io()
        };
        bump(&self.stats.batches);
        match res {
            (Ok(synced), _) => {
                self.seg.len += n;
                self.seg.tail_dirty = false;
                if let Some(took) = synced {
                    self.stats.synced(took);
                    self.unsynced_since = None;
                } else if self.unsynced_since.is_none() {
                    self.unsynced_since = Some(Instant::now());
                }
                Ok(())
            }
            (Err(e), cut) => {
                self.seg.tail_dirty = !cut;
                Err(e)
            }
        }
    }

    /// Fsync what was written, and wait for it.
    async fn sync_now(&mut self) {
        // Nothing is written while it runs (`&mut self`): all of it is covered.
        if let Some(sync) = self.start_sync() {
            self.finish_sync(sync.await);
        }
    }

    /// Start an fsync of what was written; batched mode's periodic fsync runs
    /// so without holding the writer up. `None` when nothing is unsynced.
    fn start_sync(&mut self) -> Option<tokio::task::JoinHandle<SyncDone>> {
        self.unsynced_since?;
        let file = Arc::clone(&self.seg.file);
        let path = self.seg.path.clone();
        let len = self.seg.len;
        let started = Instant::now();
        Some(tokio::task::spawn_blocking(move || {
            let t = std::time::Instant::now();
            let result = file
                .sync_data()
                .map(|()| t.elapsed())
                .map_err(io_err(&path, "fdatasync"));
            SyncDone {
                file,
                len,
                started,
                result,
            }
        }))
    }

    /// An fsync ended: what was written before it began is durable.
    fn finish_sync(&mut self, done: Result<SyncDone, tokio::task::JoinError>) {
        let done = match done {
            Ok(d) => d,
            Err(e) => {
                tracing::error!(error = %e, "audit: fsync task failed");
                return;
            }
        };
        match done.result {
            Ok(took) => {
                self.stats.synced(took);
                // Another segment since (rotation synced the old one itself)
                // keeps its own state.
                if Arc::ptr_eq(&done.file, &self.seg.file) && self.unsynced_since.is_some() {
                    self.unsynced_since = if self.seg.len == done.len {
                        None
                    } else {
                        // Written while the fsync ran: due one interval after it began.
                        Some(done.started)
                    };
                }
            }
            Err(e) => self.note_failure(&e, 0),
        }
    }

    /// Whether the next commit starts a new segment.
    fn rotation_due(&self) -> bool {
        if self.seg.len == 0 {
            return false;
        }
        let age = OffsetDateTime::now_utc() - self.seg.opened_at;
        let too_old =
            age.whole_seconds() >= i64::try_from(self.cfg.segment_max_age_secs).unwrap_or(i64::MAX);
        self.seg.len >= self.cfg.segment_max_bytes || too_old
    }

    async fn rotate_if_due(&mut self) -> Result<(), AuditError> {
        if !self.rotation_due() {
            return Ok(());
        }
        self.sync_now().await;
        if self.unsynced_since.is_some() {
            return Err(AuditError::Internal {
                reason: "cannot fsync the segment before rotating".into(),
            });
        }
        let dir = self.cfg.dir.clone();
        let next = self.next_seq;
        let (frontier, prev) = (self.frontier.clone(), self.prev);
        let new = tokio::task::spawn_blocking(move || create_segment(&dir, next, frontier, prev))
            .await
            .map_err(|e| AuditError::Internal {
                reason: format!("rotate task: {e}"),
            })??;
        let old = std::mem::replace(&mut self.seg, new);
        tracing::info!(closed = %old.path.display(), opened = %self.seg.path.display(), "audit: segment rotated");
        self.closed_segments.push(SegmentState {
            file: SegmentFile {
                path: old.path,
                first_seq: old.first_seq,
            },
            valid_len: old.len,
            records: next - old.first_seq,
            frontier_at_start: old.frontier_at_start,
            prev_at_start: old.prev_at_start,
            first_time: old.first_time,
            // At or after the segment's last record: keeps retention conservative.
            last_time: Some(now_rfc3339()),
        });
        Ok(())
    }

    async fn retain(&mut self, keep_after: OffsetDateTime) -> Result<RetentionReport, AuditError> {
        let covered = self.last_checkpoint.as_ref().map_or(0, |c| c.size);
        let deletable = self
            .closed_segments
            .iter()
            .take_while(|s| {
                s.records > 0
                    && s.file.first_seq + s.records <= covered
                    && s.last_time
                        .as_deref()
                        .and_then(record::parse_time)
                        .is_some_and(|t| t < keep_after)
            })
            .count();
        if deletable == 0 {
            return Ok(RetentionReport {
                deleted_segments: Vec::new(),
                first_seq: 0,
                last_plus_one: 0,
            });
        }
        let (first_kept, frontier, prev) = match self.closed_segments.get(deletable) {
            Some(s) => (
                s.file.first_seq,
                s.frontier_at_start.clone(),
                s.prev_at_start,
            ),
            None => (
                self.seg.first_seq,
                self.seg.frontier_at_start.clone(),
                self.seg.prev_at_start,
            ),
        };
        let anchor = Anchor {
            first_seq: first_kept,
            prev: hex::encode(prev),
            frontier,
        };
        let gone: Vec<SegmentState> = self.closed_segments[..deletable].to_vec();
        let first_deleted = gone[0].file.first_seq;
        let list: Vec<serde_json::Value> = gone
            .iter()
            .map(|s| {
                json!({
                    "segment": s.file.path.file_name().map(|n| n.to_string_lossy().into_owned()),
                    "first_seq": s.file.first_seq,
                    "records": s.records,
                })
            })
            .collect();
        let rec = NewRecord::new(Kind::Retention).result(json!({
            "anchor": anchor,
            "deleted": list,
            "covered_by_checkpoint": self.last_checkpoint.as_ref().map(|c| json!({"size": c.size, "root": c.root})),
            "keep_after": record::format_time(keep_after),
        }));
        let (tx, rx) = oneshot::channel();
        self.commit(vec![(rec, Some(tx))], Vec::new(), false, Hold::WriteNow)
            .await?;
        rx.await.map_err(|_| AuditError::Closed)??;
        self.sync_now().await;
        if self.unsynced_since.is_some() {
            return Err(AuditError::Internal {
                reason: "retention record not durable; nothing deleted".into(),
            });
        }
        let dir = self.cfg.dir.clone();
        let paths: Vec<PathBuf> = gone.iter().map(|s| s.file.path.clone()).collect();
        let to_delete = paths.clone();
        tokio::task::spawn_blocking(move || install_anchor_and_delete(&dir, &anchor, &to_delete))
            .await
            .map_err(|e| AuditError::Internal {
                reason: format!("retention task: {e}"),
            })??;
        self.closed_segments.drain(..deletable);
        tracing::info!(
            segments = paths.len(),
            first_seq = first_deleted,
            until = first_kept,
            "audit: retention deleted segments"
        );
        Ok(RetentionReport {
            deleted_segments: paths,
            first_seq: first_deleted,
            last_plus_one: first_kept,
        })
    }

    async fn rotate_key(&mut self) -> Result<String, AuditError> {
        let new = SigningKey::generate(&mut rand_core::OsRng);
        let next_path = self.key_dir.join(format!("{KEY_FILE}.next"));
        let _ = fs::remove_file(&next_path);
        checkpoint::write_key_file(&next_path, &new, true)?;
        let rotation = KeyRotation::sign(&self.key, &new, now_rfc3339());
        let rec = NewRecord::new(Kind::KeyRotation)
            .result(serde_json::to_value(&rotation).expect("serializes"));
        let old = std::mem::replace(&mut self.key, new.clone());
        // The rotation record and the first checkpoint under the new key are one write.
        let (tx, rx) = oneshot::channel();
        let res = self
            .commit(vec![(rec, Some(tx))], Vec::new(), true, Hold::WriteNow)
            .await;
        let res = res.and(rx.await.map_err(|_| AuditError::Closed)?.map(|_| ()));
        if let Err(e) = res {
            self.key = old;
            let _ = fs::remove_file(&next_path);
            return Err(e);
        }
        checkpoint::replace_key(&self.key_dir, &new)?;
        let _ = fs::remove_file(&next_path);
        checkpoint::export_public_key(&self.cfg.dir, &new)?;
        tracing::info!(old = %rotation.old_key, new = %rotation.new_key, "audit: signing key rotated");
        Ok(rotation.new_key)
    }
}

/// Retention's last step, after its record is durable: anchor first, then delete.
fn install_anchor_and_delete(
    dir: &Path,
    anchor: &Anchor,
    segments: &[PathBuf],
) -> Result<(), AuditError> {
    let tmp = dir.join(format!("{ANCHOR_FILE}.new"));
    let body = serde_json::to_vec_pretty(anchor).expect("anchor serializes");
    fs::write(&tmp, body).map_err(io_err(&tmp, "write anchor"))?;
    File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&tmp, "fsync anchor"))?;
    let dst = dir.join(ANCHOR_FILE);
    fs::rename(&tmp, &dst).map_err(io_err(&dst, "install anchor"))?;
    checkpoint::sync_dir(dir)?;
    for p in segments {
        fs::remove_file(p).map_err(io_err(p, "delete segment"))?;
    }
    checkpoint::sync_dir(dir)
}

fn encode_error(e: EncodeError) -> AuditError {
    match e {
        EncodeError::TooLarge(bytes) => AuditError::TooLarge {
            bytes,
            limit: MAX_LINE_BYTES,
        },
        EncodeError::Json(e) => AuditError::Internal {
            reason: format!("encode: {e}"),
        },
    }
}

/// A background fsync of the segment file that was `len` bytes long when it
/// began (at `started`).
struct SyncDone {
    file: Arc<File>,
    len: u64,
    started: Instant,
    result: Result<Duration, AuditError>,
}

/// The writer loop: handles queued messages in groups, the fsync and held
/// timers, and housekeeping, each under the writer's lock. In batched mode the
/// periodic fsync runs in the background (`syncing`), the loop goes on.
async fn run(shared: Arc<Shared>, mut rx: mpsc::UnboundedReceiver<Msg>) {
    let mut tick = tokio::time::interval(HOUSEKEEPING);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let (batch_interval, background_sync) = {
        let w = shared.writer.lock().await;
        (
            Duration::from_millis(w.cfg.batch_interval_ms),
            !w.own_thread,
        )
    };
    // Appends that stage their own records do not wake this loop: it looks
    // for held records every batch interval too.
    let mut held_check = tokio::time::interval(batch_interval);
    held_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut syncing: Option<tokio::task::JoinHandle<SyncDone>> = None;
    loop {
        let (fsync_due, held_due) = {
            let w = shared.writer.lock().await;
            (
                w.unsynced_since.map(|t| t + batch_interval),
                w.held.as_ref().map(|h| h.since + batch_interval),
            )
        };
        tokio::select! {
            msg = rx.recv() => {
                let Some(first) = msg else { break };
                let mut msgs = vec![first];
                while msgs.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(m) => msgs.push(m),
                        Err(_) => break,
                    }
                }
                let n = msgs.len();
                let mut w = shared.writer.lock().await;
                let closed = w.handle(msgs).await;
                // Still under the lock: see `Shared::queued`.
                shared.queued.fetch_sub(n, Ordering::AcqRel);
                if closed {
                    return;
                }
            }
            () = sleep_until_opt(held_due) => {
                let mut w = shared.writer.lock().await;
                if background_sync {
                    // Written now, made durable by the periodic fsync.
                    w.write_held().await;
                } else {
                    w.flush_held().await;
                }
            }
            () = sleep_until_opt(fsync_due), if syncing.is_none() => {
                let mut w = shared.writer.lock().await;
                if background_sync {
                    syncing = w.start_sync();
                } else {
                    w.sync_now().await;
                }
            }
            done = async { syncing.as_mut().expect("branch taken only while syncing").await },
                if syncing.is_some() =>
            {
                syncing = None;
                shared.writer.lock().await.finish_sync(done);
            }
            _ = held_check.tick(), if shared.inline => {
                let mut w = shared.writer.lock().await;
                if w.held.as_ref().is_some_and(|h| h.since.elapsed() >= batch_interval) {
                    w.flush_held().await;
                }
            }
            _ = tick.tick() => shared.writer.lock().await.housekeeping().await,
        }
    }
    // Every handle dropped without close(): make what was staged durable.
    let mut w = shared.writer.lock().await;
    if !w.closed {
        w.flush_held().await;
    }
}

async fn sleep_until_opt(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use std::{pin::pin, task::Poll};

    use super::*;

    /// A log under `tmp` with `durability`.
    fn config(tmp: &tempfile::TempDir, durability: Durability) -> AuditConfig {
        let mut cfg = AuditConfig::with_dir(tmp.path().join("audit"));
        cfg.state_dir = Some(tmp.path().join("state"));
        cfg.durability = durability;
        cfg
    }

    /// A connection with a read in flight that meets a write: the read's
    /// append (staged by its call) is polled once while the writer loop holds
    /// the lock, then left unpolled while the connection awaits the write's
    /// append. The write must not wait for the read's future to be polled.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_unpolled_staged_append_does_not_hold_the_writer_up() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = config(&tmp, Durability::Strict);
        let log = AuditLog::open(cfg).await.unwrap();
        let mut read = pin!(log.append(NewRecord::new(Kind::Statement)));
        let busy = log.inner.shared.writer.lock().await;
        let first = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx).is_pending()));
        assert!(first.await, "the writer is busy: the read's append waits");
        drop(busy);
        let write = tokio::time::timeout(
            Duration::from_secs(5),
            log.append(NewRecord::new(Kind::Statement)),
        )
        .await
        .expect("the write's append was held up by the read's unpolled one");
        let (read, write) = (read.await.unwrap(), write.unwrap());
        assert_eq!(write.seq, read.seq + 1, "in the order of the calls");
        log.close().await.unwrap();
    }

    async fn write_one(w: &mut Writer) {
        let rec = NewRecord::new(Kind::Statement);
        w.commit(vec![(rec, None)], Vec::new(), false, Hold::WriteNow)
            .await
            .unwrap();
    }

    /// Batched: a background fsync covers what was written before it began,
    /// and nothing written while it ran.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_record_written_while_the_periodic_fsync_runs_waits_for_the_next() {
        let tmp = tempfile::tempdir().unwrap();
        let mut cfg = config(&tmp, Durability::Batched);
        // The writer loop's own timer stays out of the way.
        cfg.batch_interval_ms = 10_000;
        let log = AuditLog::open(cfg).await.unwrap();
        log.append(NewRecord::new(Kind::Statement)).await.unwrap();
        let mut w = log.inner.shared.writer.lock().await;
        assert!(w.unsynced_since.is_some(), "written, not yet synced");
        let sync = w.start_sync().expect("something to sync");
        w.finish_sync(sync.await);
        assert_eq!(
            w.unsynced_since, None,
            "all of it was written before the fsync"
        );
        assert!(w.start_sync().is_none(), "nothing left to sync");

        write_one(&mut w).await;
        let sync = w.start_sync().expect("something to sync");
        write_one(&mut w).await;
        w.finish_sync(sync.await);
        assert!(
            w.unsynced_since.is_some(),
            "the second record is not covered"
        );
        let sync = w.start_sync().expect("the second record to sync");
        w.finish_sync(sync.await);
        assert_eq!(w.unsynced_since, None);
        assert_eq!(log.stats().fsyncs, 3);
        drop(w);
        log.close().await.unwrap();
    }
}
