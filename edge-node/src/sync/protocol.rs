//! The messages nodes exchange over QUIC, and their framing.
//!
//! Every exchange is one bidirectional stream: the opener writes one [`Envelope`] holding a
//! [`Request`] and finishes its side; the other end answers with one [`Envelope`] holding a
//! [`Reply`] (a peer fetch then streams the body raw until the stream ends). A frame is a
//! 4-byte big-endian length and that many bytes of JSON. The envelope carries the protocol
//! version (a node refuses versions it does not speak, with a typed error) and a message id:
//! a repeated id from the same sender is answered from memory instead of acted on twice.

use std::net::SocketAddr;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Largest frame accepted; control messages are tiny.
pub const MAX_FRAME: usize = 256 * 1024;

/// A versioned, identified message.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Envelope<T> {
    /// Protocol version of the sender.
    pub v: u16,
    /// Sender-unique id; repeats of an id are idempotent.
    pub id: u64,
    /// The message.
    pub msg: T,
}

/// An edge that may hold an object, for a peer fill.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Hash)]
pub struct PeerRef {
    /// Its node id (its certificate is checked against it).
    pub id: String,
    /// Its QUIC address.
    pub addr: SocketAddr,
}

/// Pre-position one object.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShadowOrder {
    /// `host/path?query`.
    pub key: String,
    /// Lifetime of the shadow.
    pub ttl_secs: u64,
    /// Provider priority 0–10.
    pub priority: u8,
    /// Unix milliseconds when the first request is expected: fills run earliest first.
    pub deadline_ms: u64,
    /// An edge to fill from before trying the origin.
    #[serde(default)]
    pub peer: Option<PeerRef>,
    /// The origin changed: revalidate a copy held here before re-marking it (the old copy
    /// keeps serving until the new one replaces it).
    #[serde(default)]
    pub refresh: bool,
}

/// What a node asks of another.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Broker → edge: shadow an object.
    Shadow(ShadowOrder),
    /// Broker → edge: drop a shadow (and the object, if it never served a request).
    Unshadow {
        /// `host/path?query`.
        key: String,
    },
    /// Broker → edge: purge `host/path` or every key under `host/prefix*`.
    Invalidate {
        /// The key or prefix.
        target: String,
    },
    /// Broker → edge: purge every object of `host` whose response carries one of `tags`.
    InvalidateTags {
        /// The host.
        host: String,
        /// The tags (see [`crate::tags::check`]).
        tags: Vec<String>,
    },
    /// Broker → edge: report counters, and the shadow outcomes after those in batch `ack`
    /// (the last batch the broker received; see [`crate::shadow::OutcomeLog::batch`]).
    Stats {
        /// The last outcome batch received; `None` from a broker that does not acknowledge.
        #[serde(default)]
        ack: Option<u64>,
    },
    /// Broker → edge: list live shadows, a page at a time in key order (keys after
    /// `after`), so a restarted broker can adopt what its predecessor placed.
    Shadows {
        /// The last key of the previous page.
        #[serde(default)]
        after: Option<String>,
    },
    /// Edge → edge: send a fresh cached copy of an object, never fetching it from the origin.
    PeerFetch {
        /// `host/path?query`.
        key: String,
        /// The coding the copy is for (the requesting client's, normalized): where the origin
        /// varies on `Accept-Encoding` it picks the variant. Absent from older edges; an older
        /// peer refuses a fetch that names one (requests are strict), and the fill then goes
        /// to the origin.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        accept_encoding: Option<String>,
    },
}

impl Request {
    /// Name for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Request::Shadow(_) => "shadow",
            Request::Unshadow { .. } => "unshadow",
            Request::Invalidate { .. } => "invalidate",
            Request::InvalidateTags { .. } => "invalidate_tags",
            Request::Stats { .. } => "stats",
            Request::Shadows { .. } => "shadows",
            Request::PeerFetch { .. } => "peer_fetch",
        }
    }
}

/// Counters an edge reports to the broker (totals since start; the broker takes deltas).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct StatsReport {
    /// Reporting node.
    pub node_id: String,
    /// Live shadow marks.
    pub shadows: u64,
    /// Bytes held by live shadows.
    pub shadow_bytes: u64,
    /// Requests served from a valid shadow.
    pub shadow_hits: u64,
    /// Shadows that expired without serving a request.
    pub shadows_wasted: u64,
    /// Shadows that expired after serving requests.
    pub shadows_used: u64,
    /// Shadow fills served by a peer edge.
    pub fills_peer: u64,
    /// Shadow fills served by the origin.
    pub fills_origin: u64,
    /// Shadow fills that failed.
    pub fills_failed: u64,
    /// Bytes fetched by shadow fills.
    pub fill_bytes: u64,
    /// Memory plus disk capacity of the cache.
    pub cache_capacity_bytes: u64,
    /// Requests that were the first to find their shadow.
    #[serde(default)]
    pub shadow_first_hits: u64,
    /// Cache misses (requests that went to the origin).
    #[serde(default)]
    pub misses: u64,
    /// Shadows that ended since the previous report (the cost ledger's input).
    #[serde(default)]
    pub outcomes: Vec<ShadowOutcome>,
    /// The number of the outcome batch in `outcomes` (0: none, or not numbered): the broker
    /// acknowledges it with its next poll, and settles a batch it already has only once.
    #[serde(default)]
    pub outcomes_seq: u64,
    /// Identifies the edge process (its start time in ns): a new value says the edge
    /// restarted and its shadow marks, which live in memory, are gone. 0: not told.
    #[serde(default)]
    pub boot_id: u64,
    /// Processes of this edge ([`Self::boot_id`]s, the latest last) whose shadow orders'
    /// outcomes, where not reported by now, never will be: the process crashed (or was
    /// killed), or its stop came before fills it had accepted ended. The broker prices those
    /// orders itself (each order names its process, [`Reply::Done::boot_id`]).
    #[serde(default)]
    pub lost_boots: Vec<u64>,
    /// The cache has no disk tier, so a restart empties it: copies the broker saw this edge
    /// serve before a new [`Self::boot_id`] are gone. False (as from older edges): a restart
    /// keeps them on disk.
    #[serde(default)]
    pub memory_only: bool,
    /// Names the content the cache started with: the same across restarts that recover the
    /// disk tier, new when the cache started empty (memory only, a disk tier created afresh).
    /// A new value with a new [`Self::boot_id`] says the copies the broker saw this edge
    /// serve are gone. 0: not told (older edges).
    #[serde(default)]
    pub cache_id: u64,
}

/// How one shadow ended: its lifetime, size, source and use.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ShadowOutcome {
    /// `host/path?query`.
    pub key: String,
    /// Body bytes; for a fill that failed or was overtaken, the bytes its attempts fetched
    /// (which were paid for all the same).
    pub bytes: u64,
    /// Requests served from it.
    pub hits: u64,
    /// Seconds it was held.
    pub held_secs: u64,
    /// Whether a peer edge supplied it (else the origin).
    pub peer_filled: bool,
    /// Whether the cache evicted it before its TTL ran out.
    pub evicted: bool,
    /// The fill failed (neither peer nor origin supplied a cacheable copy): nothing was ever
    /// held, and the broker must stop counting the order as a live shadow.
    #[serde(default)]
    pub failed: bool,
    /// The edge already held a fresh copy when the shadow was ordered: no bytes moved, so
    /// the order neither cost a fill nor pre-positioned anything.
    #[serde(default)]
    pub held_before: bool,
    /// Ended before its TTL by an unshadow or a purge: whether it would have been used is
    /// not known (unless it was).
    #[serde(default)]
    pub removed: bool,
    /// When it ended, Unix milliseconds on the edge's clock (0 from older edges): an outcome
    /// that reaches the broker after it ordered the key again belongs to the older order.
    #[serde(default)]
    pub ended_ms: u64,
    /// Milliseconds the fill had been running when the first client came, if that client
    /// came while it was still filling: it waited for the rest, so the shadow saved it at most
    /// this much. Absent when the first client found the shadow complete (and from older
    /// edges).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_start_ms: Option<u64>,
    /// The order it ended, as the order named it (its `deadline_ms`, which the broker keeps
    /// distinct between its orders of one key for one edge): the broker settles that order,
    /// and not a later one of the same key, whatever the two clocks say. Absent for orders
    /// that name none (the admin API's) and from older edges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<u64>,
    /// Its copy was fetched by the fill of an earlier order of the key, dropped while it ran
    /// (a purge or unshadow came after that order), whose outcome carried the fill's cost:
    /// this one is priced for its storage and what it saved, not for a fill again. Absent
    /// when false (and from older edges).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fill_paid: bool,
}

/// Unix milliseconds now, for [`ShadowOutcome::ended_ms`].
pub fn unix_ms_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl ShadowOutcome {
    /// The outcome of an order whose fill failed.
    pub fn failed(key: String) -> Self {
        ShadowOutcome {
            key,
            bytes: 0,
            hits: 0,
            held_secs: 0,
            peer_filled: false,
            evicted: false,
            failed: true,
            held_before: false,
            removed: false,
            ended_ms: unix_ms_now(),
            head_start_ms: None,
            order: None,
            fill_paid: false,
        }
    }
}

/// A live shadow an edge holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LiveShadow {
    /// `host/path?query`.
    pub key: String,
    /// Seconds until it expires.
    pub ttl_secs: u64,
    /// Provider priority 0–10.
    pub priority: u8,
}

/// Error classes a reply may carry.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The sender's protocol version is not spoken here.
    Version,
    /// The message is malformed or out of range.
    Invalid,
    /// The sender's role may not send this message.
    Forbidden,
    /// The receiver is saturated; retry later.
    Busy,
    /// The object is not held here.
    NotFound,
    /// The receiver failed.
    Internal,
    /// A class this version does not know (a newer node's): read as a failure of the
    /// receiver, so the reply's other fields still arrive, and a purge so refused is
    /// retried until the broker is upgraded. Only ever read, never sent.
    #[serde(other, skip_serializing)]
    Unknown,
}

/// What a node answers. Read leniently (unknown fields ignored): nodes are upgraded one at a
/// time, and a newer node's extra detail in a reply must not make an older one lose the
/// reply. Requests and shadow orders stay strict: a field an older edge would ignore may
/// change what it is told to do.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    /// Done; `found` says whether the target existed (unshadow, invalidate).
    Done {
        /// Whether the target existed.
        found: bool,
        /// The accepting process's [`StatsReport::boot_id`], on an accepted shadow order: its
        /// outcome comes from that process, or is lost with it ([`StatsReport::lost_boots`]).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        boot_id: Option<u64>,
    },
    /// Answer to [`Request::Stats`].
    Stats(StatsReport),
    /// Answer to [`Request::Shadows`].
    ShadowPage {
        /// Live shadows, in key order.
        shadows: Vec<LiveShadow>,
        /// Whether keys after the last one remain.
        more: bool,
        /// The listing process's [`StatsReport::boot_id`] (absent from older edges): whose
        /// orders the listed shadows' outcomes settle.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        boot_id: Option<u64>,
    },
    /// Answer to [`Request::PeerFetch`]: the response head; the body follows raw.
    PeerHead {
        /// HTTP status.
        status: u16,
        /// End-to-end response headers.
        headers: Vec<(String, String)>,
    },
    /// Refused or failed.
    Error {
        /// Class.
        code: ErrorCode,
        /// Human-readable detail.
        message: String,
    },
}

impl Reply {
    /// An error reply.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Reply::Error {
            code,
            message: message.into(),
        }
    }
}

/// Why a frame could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The stream failed.
    #[error("stream: {0}")]
    Io(#[from] std::io::Error),
    /// The frame is larger than [`MAX_FRAME`].
    #[error("frame of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// The bytes are not a message of this protocol.
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Write one length-prefixed JSON frame.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> Result<(), FrameError>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME {
        return Err(FrameError::TooLarge(body.len()));
    }
    w.write_all(&(body.len() as u32).to_be_bytes()).await?;
    w.write_all(&body).await?;
    Ok(())
}

/// What a frame's buffer starts with; it grows as the rest arrives.
const FRAME_PREALLOC: usize = 16 * 1024;

/// Read one length-prefixed JSON frame (at most [`MAX_FRAME`] bytes).
pub async fn read_frame<R, T>(r: &mut R) -> Result<T, FrameError>
where
    R: AsyncRead + Unpin,
    T: DeserializeOwned,
{
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    // Grown as bytes arrive, not allocated whole from the length a sender claims: a stream
    // that announces a large frame and sends nothing holds only what it sent.
    let mut body = Vec::with_capacity(len.min(FRAME_PREALLOC));
    (&mut *r).take(len as u64).read_to_end(&mut body).await?;
    if body.len() < len {
        return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof).into());
    }
    Ok(serde_json::from_slice(&body)?)
}

/// Read the version and id of an envelope whose message this build may not understand, so
/// a newer sender gets a typed version error instead of a parse failure.
#[derive(Debug, Deserialize)]
pub struct EnvelopeHead {
    /// Sender's version.
    pub v: u16,
    /// Message id.
    pub id: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame cut short is an error, whatever length it announced; a large announced length
    /// does not allocate ahead of the bytes.
    #[tokio::test]
    async fn a_frame_cut_short_is_an_error() {
        let mut bytes = ((MAX_FRAME - 1) as u32).to_be_bytes().to_vec();
        bytes.extend_from_slice(b"{\"v\":1");
        let mut r = &bytes[..];
        let got = read_frame::<_, EnvelopeHead>(&mut r).await;
        assert!(matches!(got, Err(FrameError::Io(_))), "{got:?}");
    }

    #[tokio::test]
    async fn frames_round_trip_and_limits_hold() {
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let msg = Envelope {
            v: VERSION,
            id: 7,
            msg: Request::Shadow(ShadowOrder {
                key: "h.com/a".into(),
                ttl_secs: 60,
                priority: 5,
                deadline_ms: 1,
                peer: Some(PeerRef {
                    id: "eu-1".into(),
                    addr: "127.0.0.1:1".parse().unwrap(),
                }),
                refresh: false,
            }),
        };
        write_frame(&mut a, &msg).await.unwrap();
        let got: Envelope<Request> = read_frame(&mut b).await.unwrap();
        assert_eq!(got, msg);

        a.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        let err = read_frame::<_, Envelope<Request>>(&mut b)
            .await
            .unwrap_err();
        assert!(matches!(err, FrameError::TooLarge(_)));
    }

    #[test]
    fn replies_from_a_newer_node_are_read_and_requests_stay_strict() {
        let newer: Reply =
            serde_json::from_str(r#"{"type":"done","found":true,"took_ms":3}"#).unwrap();
        assert_eq!(
            newer,
            Reply::Done {
                found: true,
                boot_id: None
            }
        );
        let unknown: Reply =
            serde_json::from_str(r#"{"type":"error","code":"overloaded","message":"m"}"#).unwrap();
        assert!(matches!(
            unknown,
            Reply::Error {
                code: ErrorCode::Unknown,
                ..
            }
        ));
        let order = r#"{"type":"shadow","key":"h/a","ttl_secs":1,"priority":5,"deadline_ms":0,"refresh":false}"#;
        assert!(serde_json::from_str::<Request>(order).is_ok());
        let newer = order.replace('}', r#","urgent":true}"#);
        assert!(serde_json::from_str::<Request>(&newer).is_err());
        // A peer fetch from an edge that names no coding is read as one for identity.
        let fetch: Request = serde_json::from_str(r#"{"type":"peer_fetch","key":"h/a"}"#).unwrap();
        let none = Request::PeerFetch {
            key: "h/a".into(),
            accept_encoding: None,
        };
        assert_eq!(fetch, none);
        let br = Request::PeerFetch {
            key: "h/a".into(),
            accept_encoding: Some("br".into()),
        };
        let wire = serde_json::to_string(&br).unwrap();
        assert_eq!(
            wire,
            r#"{"type":"peer_fetch","key":"h/a","accept_encoding":"br"}"#
        );
        assert_eq!(serde_json::from_str::<Request>(&wire).unwrap(), br);
    }

    #[test]
    fn wire_format_is_tagged_json() {
        let s = serde_json::to_string(&Envelope {
            v: 1,
            id: 2,
            msg: Request::Invalidate {
                target: "h.com/a*".into(),
            },
        })
        .unwrap();
        assert_eq!(
            s,
            r#"{"v":1,"id":2,"msg":{"type":"invalidate","target":"h.com/a*"}}"#
        );
        let unknown = r#"{"v":9,"id":3,"msg":{"type":"teleport"}}"#;
        assert!(serde_json::from_str::<Envelope<Request>>(unknown).is_err());
        let head: EnvelopeHead = serde_json::from_str(unknown).unwrap();
        assert_eq!((head.v, head.id), (9, 3));
    }
}
