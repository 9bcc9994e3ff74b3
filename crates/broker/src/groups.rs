//! Consumer groups: Kafka's classic group protocol and committed offsets.
//!
//! The coordinator keeps each group's membership state machine (Empty → PreparingRebalance →
//! CompletingRebalance → Stable) and answers JoinGroup and SyncGroup when the rebalance allows,
//! through one-shot channels held by the waiting members. Every state change takes the current time
//! as an argument; a ticker calls [`Coordinator::tick`] to finish rebalances and expire members whose
//! session ran out. Assignment is the clients' business: the leader's SyncGroup carries it and the
//! coordinator hands each member its part unread.
//!
//! Committed offsets are records of the internal topic `__consumer_offsets` (key: group, topic and
//! partition; value: offset and metadata, as JSON). A commit is acknowledged once its record is
//! durable; on start the topic is read back to rebuild the table, as Kafka does.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use serde::{Deserialize, Serialize};
use spate_log::batch::{self, NewRecord};
use spate_log::{Log, Partition, TopicConfig};
use tokio::sync::oneshot;

/// The internal topic of committed offsets.
pub const OFFSETS_TOPIC: &str = "__consumer_offsets";
/// Members of one group at most (Kafka's `group.max.size` default is unbounded; a bound keeps one
/// group from exhausting memory).
pub const GROUP_MEMBERS_MAX: usize = 1000;
/// Bytes of metadata a committed offset may carry (Kafka's `offset.metadata.max.bytes`).
pub const OFFSET_METADATA_MAX: usize = 4096;
/// Session timeouts clients may ask for (Kafka's defaults are 6 s to 30 min; the lower bound is
/// relaxed so tests and fast failover can use short sessions).
pub const SESSION_TIMEOUT_MIN: Duration = Duration::from_millis(1000);
pub const SESSION_TIMEOUT_MAX: Duration = Duration::from_secs(1800);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupError {
    UnknownMemberId,
    IllegalGeneration,
    RebalanceInProgress,
    InconsistentGroupProtocol,
    InvalidSessionTimeout,
    GroupMaxSizeReached,
    CoordinatorNotAvailable,
    UnknownTopicOrPartition,
    GroupIdNotFound,
    InvalidGroupId,
    /// A committed offset's metadata is longer than [`OFFSET_METADATA_MAX`].
    OffsetMetadataTooLarge,
    /// The group has members: it cannot be deleted.
    NonEmptyGroup,
    /// The group has members, which may read the topic: its offsets cannot be deleted.
    GroupSubscribedToTopic,
    /// The offsets of one commit take more than the offsets topic's `max_message_bytes`.
    InvalidCommitOffsetSize,
    /// The request names a static member (`group.instance.id`) that a newer member with the same
    /// instance id has replaced.
    FencedInstanceId,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupState {
    Empty,
    PreparingRebalance,
    CompletingRebalance,
    Stable,
}

impl GroupState {
    pub fn name(self) -> &'static str {
        match self {
            GroupState::Empty => "Empty",
            GroupState::PreparingRebalance => "PreparingRebalance",
            GroupState::CompletingRebalance => "CompletingRebalance",
            GroupState::Stable => "Stable",
        }
    }
}

/// What a JoinGroup gets back.
#[derive(Debug, Clone)]
pub struct Joined {
    pub generation: i32,
    pub protocol_type: String,
    pub protocol: String,
    pub leader: String,
    pub member_id: String,
    /// For the leader: every member and its metadata for the chosen protocol; empty for others.
    pub members: Vec<(String, Bytes)>,
    /// The leader must not compute an assignment (a static leader replaced in a stable group).
    pub skip_assignment: bool,
}

pub type JoinResult = Result<Joined, (GroupError, String)>;
pub type SyncResult = Result<(String, String, Bytes), GroupError>;

/// A JoinGroup request.
#[derive(Debug, Clone)]
pub struct JoinRequest {
    pub group_id: String,
    pub member_id: String,
    /// A static member's `group.instance.id`: it keeps its assignment across restarts.
    pub instance_id: Option<String>,
    /// Whether the client understands JoinGroup's `skip_assignment` (version 9 and later).
    pub skip_assignment_supported: bool,
    pub client_id: String,
    pub client_host: String,
    pub protocol_type: String,
    pub protocols: Vec<(String, Bytes)>,
    pub session_timeout: Duration,
    pub rebalance_timeout: Duration,
}

struct Member {
    /// Set for a static member.
    instance_id: Option<String>,
    client_id: String,
    client_host: String,
    protocols: Vec<(String, Bytes)>,
    session_timeout: Duration,
    rebalance_timeout: Duration,
    assignment: Bytes,
    last_seen: Instant,
    awaiting_join: Option<oneshot::Sender<JoinResult>>,
    awaiting_sync: Option<oneshot::Sender<SyncResult>>,
}

impl Member {
    /// The metadata this member sent for a protocol (empty when it did not name it).
    fn metadata(&self, protocol: &str) -> Bytes {
        self.protocols
            .iter()
            .find(|(n, _)| n == protocol)
            .map(|(_, md)| md.clone())
            .unwrap_or_default()
    }
}

struct Group {
    state: GroupState,
    generation: i32,
    protocol_type: Option<String>,
    protocol: Option<String>,
    leader: Option<String>,
    members: BTreeMap<String, Member>,
    /// When the current rebalance stops waiting for members to rejoin.
    rebalance_deadline: Option<Instant>,
    /// A rebalance of an empty group waits until then for more members, even when all have joined.
    gather_until: Option<Instant>,
}

impl Group {
    /// The topics the members subscribe to, read from their subscriptions when the group runs
    /// Kafka's consumer protocol; `None` when that is not known (another protocol, no protocol
    /// chosen yet, a subscription that does not parse): then every topic counts as subscribed.
    fn subscribed_topics(&self) -> Option<std::collections::HashSet<String>> {
        use kafka_protocol::messages::ConsumerProtocolSubscription;
        use kafka_protocol::protocol::Decodable;
        if self.protocol_type.as_deref() != Some("consumer") {
            return None;
        }
        let protocol = self.protocol.as_deref()?;
        let mut topics = std::collections::HashSet::new();
        for m in self.members.values() {
            let mut md = m.metadata(protocol);
            if md.len() < 2 {
                return None;
            }
            let version = md.get_i16();
            // Later versions only add fields: read them as the latest this build knows.
            let version = (version >= 0).then_some(version.min(3))?;
            let sub = ConsumerProtocolSubscription::decode(&mut md, version).ok()?;
            topics.extend(sub.topics.iter().map(|t| t.to_string()));
        }
        Some(topics)
    }

    /// The member id of the static member with this instance id.
    fn static_member(&self, instance_id: &str) -> Option<&String> {
        self.members
            .iter()
            .find(|(_, m)| m.instance_id.as_deref() == Some(instance_id))
            .map(|(id, _)| id)
    }

    /// Refuses a request naming an instance id that now belongs to another member id: the
    /// sender was replaced by a newer member with the same `group.instance.id`. An instance id
    /// the group does not know is not checked here (the member id is, by the caller).
    fn check_instance(&self, member_id: &str, instance_id: Option<&str>) -> Result<(), GroupError> {
        match instance_id.and_then(|i| self.static_member(i)) {
            Some(id) if id != member_id => Err(GroupError::FencedInstanceId),
            _ => Ok(()),
        }
    }

    /// A static member joined again without its member id (it restarted): its entry moves to a
    /// new member id and keeps its assignment, and the old member id is fenced. In a stable group,
    /// when this member still supports the group's protocol with the same metadata (the same
    /// subscription), the join is answered at once with the current generation and nothing
    /// rebalances (KIP-345); otherwise a rebalance starts, as for any join.
    fn replace_static_member(
        &mut self,
        old_id: &str,
        req: JoinRequest,
        tx: oneshot::Sender<JoinResult>,
        now: Instant,
        initial_delay: Duration,
    ) {
        let Some(mut member) = self.members.remove(old_id) else {
            let _ = tx.send(Err((GroupError::UnknownMemberId, "member removed".into())));
            return;
        };
        if let Some(earlier) = member.awaiting_join.take() {
            let _ = earlier.send(Err((
                GroupError::FencedInstanceId,
                "replaced by a newer member with the same instance id".into(),
            )));
        }
        if let Some(earlier) = member.awaiting_sync.take() {
            let _ = earlier.send(Err(GroupError::FencedInstanceId));
        }
        let instance = req.instance_id.clone().unwrap_or_default();
        let new_id = format!("{instance}-{}", uuid::Uuid::now_v7());
        let was_leader = self.leader.as_deref() == Some(old_id);
        if was_leader {
            self.leader = Some(new_id.clone());
        }
        let unchanged = self.state == GroupState::Stable
            && self.protocol.as_ref().is_some_and(|p| {
                req.protocols
                    .iter()
                    .any(|(name, md)| name == p && *md == member.metadata(p))
            });
        member.client_id = req.client_id;
        member.client_host = req.client_host;
        member.protocols = req.protocols;
        member.session_timeout = req.session_timeout;
        member.rebalance_timeout = req.rebalance_timeout;
        member.last_seen = now;
        if !unchanged {
            member.awaiting_join = Some(tx);
            self.members.insert(new_id, member);
            if self.state != GroupState::PreparingRebalance {
                self.prepare_rebalance(now, initial_delay);
            }
            if self.join_complete(now) {
                self.complete_join(now);
            }
            return;
        }
        self.members.insert(new_id.clone(), member);
        let protocol = self.protocol.clone().unwrap_or_default();
        // A replaced leader learns that it leads, with the members, and that it must not assign
        // (the group is stable: the assignment stands) when its client understands that (JoinGroup
        // v9's skip_assignment); older clients are given the old leader id, so that the new member
        // does not take itself for the leader and hand out an assignment nobody would receive.
        let (leader, members, skip_assignment) = if was_leader && req.skip_assignment_supported {
            let all = self
                .members
                .iter()
                .map(|(id, m)| (id.clone(), m.metadata(&protocol)))
                .collect();
            (new_id.clone(), all, true)
        } else if was_leader {
            (old_id.to_string(), Vec::new(), false)
        } else {
            (self.leader.clone().unwrap_or_default(), Vec::new(), false)
        };
        let _ = tx.send(Ok(Joined {
            generation: self.generation,
            protocol_type: self.protocol_type.clone().unwrap_or_default(),
            protocol,
            leader,
            member_id: new_id,
            members,
            skip_assignment,
        }));
    }

    fn new() -> Group {
        Group {
            state: GroupState::Empty,
            generation: 0,
            protocol_type: None,
            protocol: None,
            leader: None,
            members: BTreeMap::new(),
            rebalance_deadline: None,
            gather_until: None,
        }
    }

    /// Whether the join phase can end now: everyone rejoined (after the gathering delay of a
    /// group that was empty), or the rebalance timed out.
    fn join_complete(&self, now: Instant) -> bool {
        self.state == GroupState::PreparingRebalance
            && ((self.all_joined() && self.gather_until.is_none_or(|t| now >= t))
                || self.rebalance_deadline.is_some_and(|d| now >= d))
    }

    /// Protocols every member supports, in the order of the first member's preference.
    fn common_protocol(&self) -> Option<String> {
        let mut members = self.members.values();
        let first = members.next()?;
        let rest: Vec<&Member> = members.collect();
        first
            .protocols
            .iter()
            .map(|(name, _)| name)
            .find(|name| {
                rest.iter()
                    .all(|m| m.protocols.iter().any(|(n, _)| n == *name))
            })
            .cloned()
    }

    fn prepare_rebalance(&mut self, now: Instant, initial_delay: Duration) {
        let from_empty = self.state == GroupState::Empty;
        // Members waiting for an assignment learn that a new rebalance started.
        for m in self.members.values_mut() {
            if let Some(tx) = m.awaiting_sync.take() {
                let _ = tx.send(Err(GroupError::RebalanceInProgress));
            }
        }
        let timeout = self
            .members
            .values()
            .map(|m| m.rebalance_timeout)
            .max()
            .unwrap_or(Duration::ZERO);
        self.state = GroupState::PreparingRebalance;
        self.rebalance_deadline = Some(now + timeout.max(initial_delay));
        self.gather_until = from_empty.then(|| now + initial_delay);
    }

    fn all_joined(&self) -> bool {
        self.members.values().all(|m| m.awaiting_join.is_some())
    }

    /// Ends the join phase: a new generation with everyone who rejoined.
    fn complete_join(&mut self, now: Instant) {
        self.members.retain(|_, m| m.awaiting_join.is_some());
        self.rebalance_deadline = None;
        self.gather_until = None;
        if self.members.is_empty() {
            self.become_empty();
            return;
        }
        let Some(protocol) = self.common_protocol() else {
            // Cannot happen: joins with no common protocol are refused. Fail the joins loudly.
            for m in self.members.values_mut() {
                if let Some(tx) = m.awaiting_join.take() {
                    let _ = tx.send(Err((
                        GroupError::InconsistentGroupProtocol,
                        "no common protocol".into(),
                    )));
                }
            }
            self.members.clear();
            self.become_empty();
            return;
        };
        self.generation += 1;
        if !self
            .leader
            .as_ref()
            .is_some_and(|l| self.members.contains_key(l))
        {
            self.leader = self.members.keys().next().cloned();
        }
        let leader = self
            .leader
            .clone()
            .expect("a group with members has a leader");
        self.protocol = Some(protocol.clone());
        self.state = GroupState::CompletingRebalance;
        let all: Vec<(String, Bytes)> = self
            .members
            .iter()
            .map(|(id, m)| (id.clone(), m.metadata(&protocol)))
            .collect();
        let protocol_type = self.protocol_type.clone().unwrap_or_default();
        for (id, m) in self.members.iter_mut() {
            m.assignment = Bytes::new();
            m.last_seen = now;
            if let Some(tx) = m.awaiting_join.take() {
                let _ = tx.send(Ok(Joined {
                    generation: self.generation,
                    protocol_type: protocol_type.clone(),
                    protocol: protocol.clone(),
                    leader: leader.clone(),
                    member_id: id.clone(),
                    members: if *id == leader {
                        all.clone()
                    } else {
                        Vec::new()
                    },
                    skip_assignment: false,
                }));
            }
        }
    }

    fn become_empty(&mut self) {
        self.state = GroupState::Empty;
        self.leader = None;
        self.protocol = None;
        self.rebalance_deadline = None;
        self.gather_until = None;
        if self.members.is_empty() {
            self.protocol_type = None;
        }
    }

    fn remove_member(&mut self, id: &str, now: Instant, initial_delay: Duration) {
        if let Some(m) = self.members.remove(id) {
            if let Some(tx) = m.awaiting_join {
                let _ = tx.send(Err((GroupError::UnknownMemberId, "member removed".into())));
            }
            if let Some(tx) = m.awaiting_sync {
                let _ = tx.send(Err(GroupError::UnknownMemberId));
            }
        }
        if self.members.is_empty() {
            self.generation += 1;
            self.become_empty();
        } else if self.state != GroupState::PreparingRebalance {
            self.prepare_rebalance(now, initial_delay);
        }
    }
}

/// A committed offset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    pub offset: i64,
    pub leader_epoch: i32,
    pub metadata: Option<String>,
}

/// A committed offset as stored, with the creation time of the topic it was committed for: a
/// topic deleted and created again under its name has none committed (as Kafka deletes the
/// offsets of a deleted topic). Records stored before it was kept have none, and count for the
/// topic of the name.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredOffset {
    #[serde(flatten)]
    committed: Committed,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    topic_created_ms: Option<i64>,
    /// When the offset was committed (ms since the epoch), kept as it is when [`Coordinator::
    /// maintain`] writes the offset again. Absent in records written before it was kept: their
    /// record's timestamp is the commit time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    committed_ms: Option<i64>,
}

/// How long the offsets of a group without members are kept after their commit (Kafka's
/// `offsets.retention.minutes`, 7 days).
pub const OFFSETS_RETENTION_MS: i64 = 7 * 24 * 3600 * 1000;
/// How often [`Coordinator::maintain`] writes the offsets again when some were committed since.
const OFFSETS_REWRITE_MS: i64 = 3600 * 1000;
/// How often it writes them again in any case: well within the offsets topic's retention, so
/// that retention never removes the last record of an offset that still counts.
const OFFSETS_REWRITE_IDLE_MS: i64 = 24 * 3600 * 1000;
/// Bytes of a record beside its key and value in a batch, at most (lengths, deltas, attributes).
const RECORD_OVERHEAD: usize = 32;

/// Encodes `records` as batches of consecutive records, each within `max_bytes` (the offsets
/// topic's `max_message_bytes`; a record larger than that alone is a batch of its own).
fn batches(records: &[NewRecord], max_bytes: u64) -> Vec<Vec<u8>> {
    // The batch header, and room to spare.
    let budget = (max_bytes as usize).saturating_sub(128);
    let size = |r: &NewRecord| {
        RECORD_OVERHEAD + r.key.as_ref().map_or(0, Vec::len) + r.value.as_ref().map_or(0, Vec::len)
    };
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, r) in records.iter().enumerate() {
        if i > start && bytes + size(r) > budget {
            out.extend(batch::encode(&records[start..i]));
            (start, bytes) = (i, 0);
        }
        bytes += size(r);
    }
    out.extend(batch::encode(&records[start..]));
    out
}

/// The record of the offset of `key` (group, topic, partition) in the offsets topic; without a
/// value, the record that removes it.
fn offset_record(
    (group, topic, partition): &(String, String, u32),
    value: Option<&StoredOffset>,
    now_ms: i64,
) -> NewRecord {
    let key = OffsetKey {
        group: group.clone(),
        topic: topic.clone(),
        partition: *partition,
    };
    NewRecord {
        timestamp_ms: now_ms,
        key: Some(serde_json::to_vec(&key).expect("keys serialize")),
        value: value.map(|v| serde_json::to_vec(v).expect("offsets serialize")),
        headers: Vec::new(),
    }
}

#[derive(Serialize, Deserialize)]
struct OffsetKey {
    group: String,
    topic: String,
    partition: u32,
}

/// A topic's partitions and their committed offsets (`None` when nothing was committed).
pub type TopicOffsets = (String, Vec<(u32, Option<Committed>)>);

/// Where a group stands on one partition.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GroupPosition {
    pub topic: String,
    pub partition: u32,
    pub committed: u64,
    pub end: u64,
}

impl GroupPosition {
    pub fn lag(&self) -> u64 {
        self.end.saturating_sub(self.committed)
    }
}

/// A summary of a group, for ListGroups and DescribeGroups.
#[derive(Debug, Clone)]
pub struct GroupSummary {
    pub group_id: String,
    pub state: GroupState,
    pub protocol_type: String,
    pub protocol: String,
    pub members: Vec<MemberSummary>,
}

/// A member of a group, for DescribeGroups.
#[derive(Debug, Clone)]
pub struct MemberSummary {
    pub member_id: String,
    /// A static member's `group.instance.id`.
    pub instance_id: Option<String>,
    pub client_id: String,
    pub client_host: String,
    /// The member's metadata for the chosen protocol.
    pub metadata: Bytes,
    pub assignment: Bytes,
}

struct State {
    groups: HashMap<String, Group>,
    offsets: HashMap<(String, String, u32), StoredOffset>,
}

/// What [`Coordinator::maintain`] keeps between runs.
struct Upkeep {
    /// When offsets were last written again (ms).
    last_ms: i64,
    /// Whether any were committed since.
    committed: bool,
    /// Groups holding offsets seen without members, and since when (the first time seen so:
    /// after a restart every group is without members until its consumers join again).
    empty_since: HashMap<String, i64>,
}

pub struct Coordinator {
    log: Arc<Log>,
    offsets_log: Arc<Partition>,
    offsets_config: TopicConfig,
    state: Mutex<State>,
    /// Held (shared) by commits from their append until their offsets are in `state`, and
    /// (exclusively) by [`Coordinator::maintain`] while it writes the offsets again: a rewrite
    /// must not write an offset older than one appended before it.
    commits: tokio::sync::RwLock<()>,
    upkeep: Mutex<Upkeep>,
    /// How long a rebalance of an empty group waits for more members before it completes.
    initial_delay: Duration,
}

fn err<T>(e: spate_log::Error) -> Result<T, crate::BrokerError> {
    Err(e.into())
}

impl Coordinator {
    /// Opens the coordinator, creating the offsets topic when absent and reading it back.
    pub fn open(
        log: Arc<Log>,
        initial_delay: Duration,
        now_ms: i64,
    ) -> Result<Coordinator, crate::BrokerError> {
        let topic = match log.topic(OFFSETS_TOPIC) {
            Ok(t) => t,
            Err(spate_log::Error::UnknownTopic(_)) => {
                let config = TopicConfig {
                    partitions: 1,
                    // As Kafka's offsets.retention.minutes: offsets of groups silent for a week go.
                    retention_ms: Some(7 * 24 * 3600 * 1000),
                    segment_bytes: 64 << 20,
                    ..TopicConfig::default()
                };
                log.create_topic(OFFSETS_TOPIC, config, now_ms)?
            }
            Err(e) => return err(e),
        };
        let partition = topic.partition(0)?.clone();
        let mut offsets = HashMap::new();
        let mut offset = partition.log_start_offset();
        while offset < partition.high_watermark() {
            let bytes = partition.read(offset, 1 << 20)?;
            if bytes.is_empty() {
                break;
            }
            for (at, h) in batch::headers(&bytes).map_err(spate_log::Error::from)? {
                let records = batch::decode(&bytes[at..at + h.total_bytes() as usize])
                    .map_err(spate_log::Error::from)?;
                for r in records {
                    let Some(k) = &r.key else {
                        continue;
                    };
                    let Ok(k) = serde_json::from_slice::<OffsetKey>(k) else {
                        tracing::warn!(offset = r.offset, "skipping an unreadable offset key");
                        continue;
                    };
                    let key = (k.group, k.topic, k.partition);
                    // No value: the offset expired.
                    let Some(v) = &r.value else {
                        offsets.remove(&key);
                        continue;
                    };
                    match serde_json::from_slice::<StoredOffset>(v) {
                        Ok(mut c) => {
                            c.committed_ms.get_or_insert(r.timestamp_ms);
                            offsets.insert(key, c);
                        }
                        Err(_) => tracing::warn!(
                            offset = r.offset,
                            "skipping an unreadable offset commit record"
                        ),
                    }
                }
                offset = h.base_offset as u64 + h.offset_count();
            }
        }
        tracing::info!(committed = offsets.len(), "consumer group offsets loaded");
        Ok(Coordinator {
            log,
            offsets_config: topic.config(),
            offsets_log: partition,
            state: Mutex::new(State {
                groups: HashMap::new(),
                offsets,
            }),
            commits: tokio::sync::RwLock::new(()),
            upkeep: Mutex::new(Upkeep {
                last_ms: now_ms,
                committed: false,
                empty_since: HashMap::new(),
            }),
            initial_delay,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// JoinGroup: the answer comes when the rebalance completes.
    pub fn join(&self, req: JoinRequest, now: Instant) -> oneshot::Receiver<JoinResult> {
        let (tx, rx) = oneshot::channel();
        let fail = |tx: oneshot::Sender<JoinResult>, e: GroupError, why: &str| {
            let _ = tx.send(Err((e, why.to_string())));
        };
        if req.group_id.is_empty() {
            fail(tx, GroupError::InvalidGroupId, "group id is empty");
            return rx;
        }
        if !(SESSION_TIMEOUT_MIN..=SESSION_TIMEOUT_MAX).contains(&req.session_timeout) {
            fail(
                tx,
                GroupError::InvalidSessionTimeout,
                "session timeout out of range",
            );
            return rx;
        }
        if req.protocol_type.is_empty() || req.protocols.is_empty() {
            fail(
                tx,
                GroupError::InconsistentGroupProtocol,
                "no protocol given",
            );
            return rx;
        }
        let mut state = self.lock();
        let group = state
            .groups
            .entry(req.group_id.clone())
            .or_insert_with(Group::new);
        if group
            .protocol_type
            .as_ref()
            .is_some_and(|t| *t != req.protocol_type)
            && !group.members.is_empty()
        {
            fail(
                tx,
                GroupError::InconsistentGroupProtocol,
                "protocol type differs from the group's",
            );
            return rx;
        }
        // A static member joining without its member id (after a restart) takes the place of
        // the member holding its instance id.
        let replacing = match (&req.instance_id, req.member_id.is_empty()) {
            (Some(instance), true) => group.static_member(instance).cloned(),
            _ => None,
        };
        let member_id = if let Some(old) = &replacing {
            old.clone()
        } else if req.member_id.is_empty() {
            let prefix = req.instance_id.as_deref().unwrap_or(&req.client_id);
            format!("{prefix}-{}", uuid::Uuid::now_v7())
        } else if group
            .check_instance(&req.member_id, req.instance_id.as_deref())
            .is_err()
        {
            fail(
                tx,
                GroupError::FencedInstanceId,
                "the instance id belongs to a newer member",
            );
            return rx;
        } else if group.members.contains_key(&req.member_id) {
            req.member_id.clone()
        } else {
            fail(tx, GroupError::UnknownMemberId, "unknown member id");
            return rx;
        };
        let supported_by_all = group.members.is_empty()
            || req.protocols.iter().any(|(name, _)| {
                group
                    .members
                    .iter()
                    .filter(|(id, _)| **id != member_id)
                    .all(|(_, m)| m.protocols.iter().any(|(n, _)| n == name))
            });
        if !supported_by_all {
            fail(
                tx,
                GroupError::InconsistentGroupProtocol,
                "no protocol in common with the group",
            );
            return rx;
        }
        if !group.members.contains_key(&member_id) && group.members.len() >= GROUP_MEMBERS_MAX {
            fail(tx, GroupError::GroupMaxSizeReached, "the group is full");
            return rx;
        }
        group.protocol_type = Some(req.protocol_type.clone());
        if let Some(old) = replacing {
            group.replace_static_member(&old, req, tx, now, self.initial_delay);
            return rx;
        }
        let member = group.members.entry(member_id).or_insert_with(|| Member {
            instance_id: req.instance_id.clone(),
            client_id: req.client_id.clone(),
            client_host: req.client_host.clone(),
            protocols: Vec::new(),
            session_timeout: req.session_timeout,
            rebalance_timeout: req.rebalance_timeout,
            assignment: Bytes::new(),
            last_seen: now,
            awaiting_join: None,
            awaiting_sync: None,
        });
        member.protocols = req.protocols;
        member.session_timeout = req.session_timeout;
        member.rebalance_timeout = req.rebalance_timeout;
        member.last_seen = now;
        // A repeated join replaces the earlier one, whose connection has given up on it.
        member.awaiting_join = Some(tx);
        if group.state != GroupState::PreparingRebalance {
            group.prepare_rebalance(now, self.initial_delay);
        }
        if group.join_complete(now) {
            group.complete_join(now);
        }
        rx
    }

    /// SyncGroup: the leader hands out assignments; members get theirs once the leader has.
    pub fn sync(
        &self,
        group_id: &str,
        generation: i32,
        member: (&str, Option<&str>),
        assignments: Vec<(String, Bytes)>,
        now: Instant,
    ) -> oneshot::Receiver<SyncResult> {
        let (tx, rx) = oneshot::channel();
        let (member_id, instance_id) = member;
        let mut state = self.lock();
        let Some(group) = state.groups.get_mut(group_id) else {
            let _ = tx.send(Err(GroupError::UnknownMemberId));
            return rx;
        };
        if let Err(e) = group.check_instance(member_id, instance_id) {
            let _ = tx.send(Err(e));
            return rx;
        }
        let Some(member) = group.members.get_mut(member_id) else {
            let _ = tx.send(Err(GroupError::UnknownMemberId));
            return rx;
        };
        member.last_seen = now;
        if generation != group.generation {
            let _ = tx.send(Err(GroupError::IllegalGeneration));
            return rx;
        }
        let protocol_type = group.protocol_type.clone().unwrap_or_default();
        let protocol = group.protocol.clone().unwrap_or_default();
        match group.state {
            GroupState::Empty | GroupState::PreparingRebalance => {
                let _ = tx.send(Err(GroupError::RebalanceInProgress));
            }
            GroupState::Stable => {
                let _ = tx.send(Ok((protocol_type, protocol, member.assignment.clone())));
            }
            GroupState::CompletingRebalance => {
                member.awaiting_sync = Some(tx);
                if group.leader.as_deref() == Some(member_id) {
                    let mut given: HashMap<String, Bytes> = assignments.into_iter().collect();
                    for (id, m) in group.members.iter_mut() {
                        m.assignment = given.remove(id).unwrap_or_default();
                        if let Some(tx) = m.awaiting_sync.take() {
                            let _ = tx.send(Ok((
                                protocol_type.clone(),
                                protocol.clone(),
                                m.assignment.clone(),
                            )));
                        }
                    }
                    group.state = GroupState::Stable;
                }
            }
        }
        rx
    }

    pub fn heartbeat(
        &self,
        group_id: &str,
        generation: i32,
        member: (&str, Option<&str>),
        now: Instant,
    ) -> Result<(), GroupError> {
        let (member_id, instance_id) = member;
        let mut state = self.lock();
        let group = state
            .groups
            .get_mut(group_id)
            .ok_or(GroupError::UnknownMemberId)?;
        group.check_instance(member_id, instance_id)?;
        let member = group
            .members
            .get_mut(member_id)
            .ok_or(GroupError::UnknownMemberId)?;
        member.last_seen = now;
        if generation != group.generation {
            return Err(GroupError::IllegalGeneration);
        }
        match group.state {
            GroupState::PreparingRebalance => Err(GroupError::RebalanceInProgress),
            _ => Ok(()),
        }
    }

    /// LeaveGroup: each member's result. A member is named by its member id, or, for a static
    /// member, by its instance id (the member id may then be empty; when given, it must be the
    /// one the instance id belongs to).
    pub fn leave(
        &self,
        group_id: &str,
        members: &[(String, Option<String>)],
        now: Instant,
    ) -> Vec<Result<(), GroupError>> {
        let mut state = self.lock();
        let Some(group) = state.groups.get_mut(group_id) else {
            return members
                .iter()
                .map(|_| Err(GroupError::UnknownMemberId))
                .collect();
        };
        let results = members
            .iter()
            .map(|(member_id, instance_id)| {
                let id = match instance_id {
                    Some(instance) => match group.static_member(instance) {
                        None => return Err(GroupError::UnknownMemberId),
                        Some(id) if !member_id.is_empty() && id != member_id => {
                            return Err(GroupError::FencedInstanceId);
                        }
                        Some(id) => id.clone(),
                    },
                    None if group.members.contains_key(member_id) => member_id.clone(),
                    None => return Err(GroupError::UnknownMemberId),
                };
                group.remove_member(&id, now, self.initial_delay);
                Ok(())
            })
            .collect();
        if group.join_complete(now) {
            group.complete_join(now);
        }
        results
    }

    /// Finishes rebalances whose time is up and removes members whose session expired.
    pub fn tick(&self, now: Instant) {
        let mut state = self.lock();
        for group in state.groups.values_mut() {
            let expired: Vec<String> = group
                .members
                .iter()
                .filter(|(_, m)| {
                    m.awaiting_join.is_none() && now.duration_since(m.last_seen) > m.session_timeout
                })
                .map(|(id, _)| id.clone())
                .collect();
            for id in expired {
                tracing::info!(member = %id, "consumer group member session expired");
                group.remove_member(&id, now, self.initial_delay);
            }
            if group.join_complete(now) {
                group.complete_join(now);
            }
        }
        // Forget empty groups that hold no offsets.
        let offsets = &state.offsets;
        let keep: Vec<String> = state
            .groups
            .iter()
            .filter(|(id, g)| !g.members.is_empty() || offsets.keys().any(|(gid, _, _)| gid == *id))
            .map(|(id, _)| id.clone())
            .collect();
        state.groups.retain(|id, _| keep.contains(id));
    }

    /// Checks that a commit may proceed: a member of the current generation, or a group without
    /// members for commits outside group management (generation -1, no member id).
    fn check_commit(
        &self,
        group_id: &str,
        generation: i32,
        member: (&str, Option<&str>),
        now: Instant,
    ) -> Result<(), GroupError> {
        let (member_id, instance_id) = member;
        let mut state = self.lock();
        let Some(group) = state.groups.get_mut(group_id) else {
            return if generation < 0 {
                Ok(())
            } else {
                Err(GroupError::IllegalGeneration)
            };
        };
        group.check_instance(member_id, instance_id)?;
        if generation < 0 && member_id.is_empty() {
            return if group.members.is_empty() {
                Ok(())
            } else {
                Err(GroupError::IllegalGeneration)
            };
        }
        let member = group
            .members
            .get_mut(member_id)
            .ok_or(GroupError::UnknownMemberId)?;
        member.last_seen = now;
        if generation != group.generation {
            return Err(GroupError::IllegalGeneration);
        }
        if group.state == GroupState::CompletingRebalance {
            return Err(GroupError::RebalanceInProgress);
        }
        Ok(())
    }

    /// OffsetCommit: stores the offsets durably, then answers per partition.
    pub async fn commit(
        &self,
        group_id: &str,
        generation: i32,
        member: (&str, Option<&str>),
        offsets: Vec<(String, u32, Committed)>,
        now: Instant,
    ) -> Result<Vec<Result<(), GroupError>>, GroupError> {
        if group_id.is_empty() {
            return Err(GroupError::InvalidGroupId);
        }
        self.check_commit(group_id, generation, member, now)?;
        let mut results = Vec::with_capacity(offsets.len());
        let mut records = Vec::new();
        let mut accepted = Vec::new();
        let now_ms = crate::now_ms();
        for (topic, partition, c) in offsets {
            if c.metadata
                .as_ref()
                .is_some_and(|m| m.len() > OFFSET_METADATA_MAX)
            {
                results.push(Err(GroupError::OffsetMetadataTooLarge));
                continue;
            }
            let created = match self.log.topic(&topic) {
                Ok(t) if partition < t.config().partitions => t.created_ms,
                _ => {
                    results.push(Err(GroupError::UnknownTopicOrPartition));
                    continue;
                }
            };
            let c = StoredOffset {
                committed: c,
                topic_created_ms: Some(created),
                committed_ms: Some(now_ms),
            };
            results.push(Ok(()));
            let key = (group_id.to_string(), topic, partition);
            records.push(offset_record(&key, Some(&c), now_ms));
            accepted.push((key, c));
        }
        if let Some(mut bytes) = batch::encode(&records) {
            // One commit is one batch, stored whole or not at all.
            if bytes.len() as u64 > self.offsets_config.max_message_bytes {
                for r in results.iter_mut().filter(|r| r.is_ok()) {
                    *r = Err(GroupError::InvalidCommitOffsetSize);
                }
                return Ok(results);
            }
            let _writing = self.commits.read().await;
            let p = self.offsets_log.clone();
            let config = self.offsets_config;
            let appended =
                tokio::task::spawn_blocking(move || p.append(&mut bytes, now_ms, &config)).await;
            match appended {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    tracing::error!(error = %e, "failed to store committed offsets");
                    return Err(GroupError::CoordinatorNotAvailable);
                }
                Err(e) => {
                    tracing::error!(error = %e, "offset commit task failed");
                    return Err(GroupError::CoordinatorNotAvailable);
                }
            }
            let mut state = self.lock();
            for (k, c) in accepted {
                state.offsets.insert(k, c);
            }
            self.upkeep().committed = true;
        }
        Ok(results)
    }

    /// DeleteGroups: removes a group without members and its committed offsets, durably.
    pub async fn delete_group(&self, group_id: &str) -> Result<(), GroupError> {
        if group_id.is_empty() {
            return Err(GroupError::InvalidGroupId);
        }
        let _writing = self.commits.read().await;
        let keys: Vec<(String, String, u32)> = {
            let state = self.lock();
            let group = state.groups.get(group_id);
            if group.is_some_and(|g| !g.members.is_empty()) {
                return Err(GroupError::NonEmptyGroup);
            }
            let keys: Vec<_> = state
                .offsets
                .keys()
                .filter(|(g, _, _)| g == group_id)
                .cloned()
                .collect();
            if keys.is_empty() && group.is_none() {
                return Err(GroupError::GroupIdNotFound);
            }
            keys
        };
        self.remove_offsets(group_id, &keys).await?;
        let mut state = self.lock();
        // A member may have joined meanwhile: its group stays, without the offsets.
        for k in &keys {
            state.offsets.remove(k);
        }
        if state
            .groups
            .get(group_id)
            .is_some_and(|g| g.members.is_empty())
        {
            state.groups.remove(group_id);
        }
        Ok(())
    }

    /// OffsetDelete: removes committed offsets, durably, of topics the group's members do not
    /// subscribe to (any topic of a group without members); per partition, `Ok` also for one
    /// without an offset.
    #[allow(clippy::type_complexity)]
    pub async fn delete_offsets(
        &self,
        group_id: &str,
        topics: Vec<(String, Vec<u32>)>,
    ) -> Result<Vec<(String, Vec<(u32, Result<(), GroupError>)>)>, GroupError> {
        if group_id.is_empty() {
            return Err(GroupError::InvalidGroupId);
        }
        let _writing = self.commits.read().await;
        let mut keys = Vec::new();
        let results = {
            let state = self.lock();
            let group = state.groups.get(group_id);
            if group.is_none() && !state.offsets.keys().any(|(g, _, _)| g == group_id) {
                return Err(GroupError::GroupIdNotFound);
            }
            // While the group has members, the topics they read keep their offsets.
            let (active, subscribed) = match group {
                Some(g) if !g.members.is_empty() => (true, g.subscribed_topics()),
                _ => (false, None),
            };
            topics
                .into_iter()
                .map(|(topic, partitions)| {
                    let known = self.log.topic(&topic).ok();
                    let results = partitions
                        .into_iter()
                        .map(|p| {
                            let result = match &known {
                                Some(t) if p < t.config().partitions => {
                                    if active
                                        && subscribed.as_ref().is_none_or(|s| s.contains(&topic))
                                    {
                                        Err(GroupError::GroupSubscribedToTopic)
                                    } else {
                                        let k = (group_id.to_string(), topic.clone(), p);
                                        if state.offsets.contains_key(&k) {
                                            keys.push(k);
                                        }
                                        Ok(())
                                    }
                                }
                                _ => Err(GroupError::UnknownTopicOrPartition),
                            };
                            (p, result)
                        })
                        .collect();
                    (topic, results)
                })
                .collect()
        };
        self.remove_offsets(group_id, &keys).await?;
        let mut state = self.lock();
        for k in &keys {
            state.offsets.remove(k);
        }
        Ok(results)
    }

    /// Writes a removal record for each key (the caller holds `commits`).
    async fn remove_offsets(
        &self,
        group_id: &str,
        keys: &[(String, String, u32)],
    ) -> Result<(), GroupError> {
        let now_ms = crate::now_ms();
        let removals: Vec<NewRecord> = keys
            .iter()
            .map(|k| offset_record(k, None, now_ms))
            .collect();
        if let Err(e) = self.append_offsets(&removals, now_ms).await {
            tracing::error!(group = group_id, error = %e, "failed to store removed offsets");
            return Err(GroupError::CoordinatorNotAvailable);
        }
        Ok(())
    }

    /// Appends offset records in batches within the offsets topic's `max_message_bytes`, each
    /// durable before the next; the offset of the first, when there were any.
    async fn append_offsets(
        &self,
        records: &[NewRecord],
        now_ms: i64,
    ) -> Result<Option<u64>, crate::BrokerError> {
        let mut first = None;
        for mut bytes in batches(records, self.offsets_config.max_message_bytes) {
            let (p, config) = (self.offsets_log.clone(), self.offsets_config);
            let appended =
                tokio::task::spawn_blocking(move || p.append(&mut bytes, now_ms, &config))
                    .await
                    .map_err(|e| crate::BrokerError::Internal(e.to_string()))??;
            first.get_or_insert(appended.base_offset);
        }
        Ok(first)
    }

    fn upkeep(&self) -> MutexGuard<'_, Upkeep> {
        self.upkeep.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps the offsets topic small and its records young, as Kafka's compaction and offset
    /// expiry do: when due (hourly after commits, daily in any case) or `force`d, writes every
    /// offset that still counts again, a removal for each that expired or whose topic was
    /// deleted, and then deletes the segments wholly before what it wrote. An offset expires
    /// when it was committed more than [`OFFSETS_RETENTION_MS`] ago and its group has been
    /// seen without members for as long. Returns the offsets written again, `None` when not due.
    pub async fn maintain(
        &self,
        now_ms: i64,
        force: bool,
    ) -> Result<Option<usize>, crate::BrokerError> {
        {
            let u = self.upkeep();
            let age = now_ms.saturating_sub(u.last_ms);
            let due = (u.committed && age >= OFFSETS_REWRITE_MS) || age >= OFFSETS_REWRITE_IDLE_MS;
            if !force && !due {
                return Ok(None);
            }
        }
        let _exclusive = self.commits.write().await;
        let (records, kept) = {
            let mut state = self.lock();
            let mut upkeep = self.upkeep();
            let State { groups, offsets } = &mut *state;
            let empty_since = &mut upkeep.empty_since;
            let with_offsets: std::collections::HashSet<&String> =
                offsets.keys().map(|(g, _, _)| g).collect();
            empty_since.retain(|g, _| with_offsets.contains(g));
            for g in with_offsets {
                if groups.get(g).is_some_and(|g| !g.members.is_empty()) {
                    empty_since.remove(g);
                } else {
                    empty_since.entry(g.clone()).or_insert(now_ms);
                }
            }
            let mut records = Vec::with_capacity(offsets.len());
            let mut gone = Vec::new();
            for (k, s) in offsets.iter() {
                let (group, topic, _) = k;
                let old = |since: i64| now_ms.saturating_sub(since) > OFFSETS_RETENTION_MS;
                let expired = empty_since.get(group).is_some_and(|&t| old(t))
                    && old(s.committed_ms.unwrap_or(now_ms));
                let value = if expired || self.current(topic, s).is_none() {
                    gone.push(k.clone());
                    None
                } else {
                    Some(s)
                };
                records.push(offset_record(k, value, now_ms));
            }
            for k in gone {
                offsets.remove(&k);
            }
            (records, offsets.len())
        };
        let first = self.append_offsets(&records, now_ms).await?;
        let from = first.unwrap_or_else(|| self.offsets_log.log_end_offset());
        let p = self.offsets_log.clone();
        let deleted = tokio::task::spawn_blocking(move || p.delete_before(from))
            .await
            .map_err(|e| crate::BrokerError::Internal(e.to_string()))??;
        {
            let mut u = self.upkeep();
            u.last_ms = now_ms;
            u.committed = false;
        }
        tracing::debug!(
            offsets = kept,
            segments_deleted = deleted,
            "committed offsets written again"
        );
        Ok(Some(kept))
    }

    /// The committed offset of a stored one, unless committed for a topic of the name deleted
    /// since.
    fn current(&self, topic: &str, stored: &StoredOffset) -> Option<Committed> {
        let replaced = stored
            .topic_created_ms
            .is_some_and(|c| self.log.topic(topic).map_or(true, |t| t.created_ms != c));
        (!replaced).then(|| stored.committed.clone())
    }

    /// OffsetFetch: committed offsets of a group, for the given partitions or all.
    pub fn fetch_offsets(
        &self,
        group_id: &str,
        wanted: Option<Vec<(String, Vec<u32>)>>,
    ) -> Vec<TopicOffsets> {
        let state = self.lock();
        match wanted {
            Some(topics) => topics
                .into_iter()
                .map(|(topic, parts)| {
                    let found = parts
                        .into_iter()
                        .map(|p| {
                            let c = state
                                .offsets
                                .get(&(group_id.to_string(), topic.clone(), p))
                                .and_then(|s| self.current(&topic, s));
                            (p, c)
                        })
                        .collect();
                    (topic, found)
                })
                .collect(),
            None => {
                let mut by_topic: BTreeMap<String, Vec<(u32, Option<Committed>)>> = BTreeMap::new();
                for ((g, t, p), s) in state.offsets.iter() {
                    if g == group_id
                        && let Some(c) = self.current(t, s)
                    {
                        by_topic.entry(t.clone()).or_default().push((*p, Some(c)));
                    }
                }
                by_topic.into_iter().collect()
            }
        }
    }

    /// A group's committed offsets with the end of each partition, for lag.
    pub fn positions(&self, broker: &crate::Broker, group_id: &str) -> Vec<GroupPosition> {
        let mut out = Vec::new();
        for (topic, parts) in self.fetch_offsets(group_id, None) {
            let Ok(t) = broker.topic(&topic) else {
                continue;
            };
            for (partition, committed) in parts {
                if let (Ok(p), Some(c)) = (t.partition(partition), committed) {
                    let committed = c.offset.max(0) as u64;
                    out.push(GroupPosition {
                        topic: topic.clone(),
                        partition,
                        committed,
                        end: p.high_watermark(),
                    });
                }
            }
        }
        out
    }

    /// Groups with members or offsets.
    pub fn list(&self) -> Vec<GroupSummary> {
        let state = self.lock();
        let mut ids: Vec<String> = state.groups.keys().cloned().collect();
        for (g, _, _) in state.offsets.keys() {
            if !ids.contains(g) {
                ids.push(g.clone());
            }
        }
        ids.sort();
        drop(state);
        ids.iter().filter_map(|id| self.describe(id)).collect()
    }

    pub fn describe(&self, group_id: &str) -> Option<GroupSummary> {
        let state = self.lock();
        let Some(g) = state.groups.get(group_id) else {
            return state
                .offsets
                .keys()
                .any(|(gid, _, _)| gid == group_id)
                .then(|| GroupSummary {
                    group_id: group_id.to_string(),
                    state: GroupState::Empty,
                    protocol_type: "consumer".into(),
                    protocol: String::new(),
                    members: Vec::new(),
                });
        };
        let protocol = g.protocol.clone().unwrap_or_default();
        Some(GroupSummary {
            group_id: group_id.to_string(),
            state: g.state,
            protocol_type: g.protocol_type.clone().unwrap_or_default(),
            protocol: protocol.clone(),
            members: g
                .members
                .iter()
                .map(|(id, m)| MemberSummary {
                    member_id: id.clone(),
                    instance_id: m.instance_id.clone(),
                    client_id: m.client_id.clone(),
                    client_host: m.client_host.clone(),
                    metadata: m.metadata(&protocol),
                    assignment: m.assignment.clone(),
                })
                .collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use spate_log::LogConfig;
    use spate_log::mem::MemStorage;

    fn coordinator(disk: &MemStorage) -> Coordinator {
        coordinator_gathering(disk, Duration::ZERO)
    }

    /// A coordinator whose empty groups wait `delay` for more members.
    fn coordinator_gathering(disk: &MemStorage, delay: Duration) -> Coordinator {
        let log = Log::open(
            Arc::new(disk.clone()),
            std::path::Path::new("/d"),
            LogConfig::default(),
        )
        .unwrap();
        let log = Arc::new(log);
        if log.topic("t").is_err() {
            log.create_topic(
                "t",
                TopicConfig {
                    partitions: 3,
                    ..TopicConfig::default()
                },
                0,
            )
            .unwrap();
        }
        Coordinator::open(log, delay, 0).unwrap()
    }

    #[tokio::test]
    async fn offsets_written_again_outlive_retention_and_expire_without_members() {
        let disk = MemStorage::new();
        // Small segments, so that commits fill several and retention has some to drop.
        let open = |disk: &MemStorage, now_ms: i64| {
            let log = Arc::new(
                Log::open(
                    Arc::new(disk.clone()),
                    std::path::Path::new("/d"),
                    LogConfig::default(),
                )
                .unwrap(),
            );
            if log.topic("t").is_err() {
                log.create_topic("t", TopicConfig::default(), 0).unwrap();
                let config = TopicConfig {
                    partitions: 1,
                    retention_ms: Some(OFFSETS_RETENTION_MS as u64),
                    segment_bytes: 4096,
                    max_message_bytes: 4096,
                    ..TopicConfig::default()
                };
                log.create_topic(OFFSETS_TOPIC, config, 0).unwrap();
            }
            (
                Coordinator::open(log.clone(), Duration::ZERO, now_ms).unwrap(),
                log,
            )
        };
        let now_ms = crate::now_ms();
        let (c, log) = open(&disk, now_ms);
        let t0 = Instant::now();
        let a = ready(join(&c, "", t0)).unwrap().unwrap();
        let _ = ready(c.sync("g", 1, (&a.member_id, None), vec![], t0));
        let commit = |offset| {
            vec![(
                "t".to_string(),
                0,
                Committed {
                    offset,
                    leader_epoch: -1,
                    metadata: None,
                },
            )]
        };
        // "g" has a member; "idle" commits outside group management and has none.
        for i in 0..100 {
            c.commit("g", 1, (&a.member_id, None), commit(i), t0)
                .await
                .unwrap();
        }
        c.commit("idle", -1, ("", None), commit(3), t0)
            .await
            .unwrap();
        let offsets = c.offsets_log.clone();
        let segments = |p: &Partition| p.info().segments;
        assert!(segments(&offsets) > 2, "commits fill several segments");
        // Not due yet: commits came within the hour.
        assert_eq!(c.maintain(now_ms + 1000, false).await.unwrap(), None);

        // A day on, both are written again; "idle" is seen without members from now on.
        let day = 24 * 3600 * 1000;
        assert_eq!(c.maintain(now_ms + day, false).await.unwrap(), Some(2));
        // Eight days on: what still counts is written again, the rest removed.
        let later = now_ms + 8 * day + 2000;
        assert_eq!(c.maintain(later, false).await.unwrap(), Some(1));
        let got = c.fetch_offsets("g", None);
        assert_eq!(got[0].1[0].1.as_ref().map(|c| c.offset), Some(99));
        assert!(c.fetch_offsets("idle", None).is_empty());
        assert_eq!(
            segments(&offsets),
            1,
            "segments before the rewrite are deleted"
        );
        // Retention a day later removes nothing that counts; neither does a restart.
        log.apply_retention(later + 24 * 3600 * 1000).unwrap();
        drop((c, log, offsets));
        let (c, _log) = open(&disk.restart(spate_log::mem::Unsynced::Drop), later);
        let got = c.fetch_offsets("g", None);
        assert_eq!(got[0].1[0].1.as_ref().map(|c| c.offset), Some(99));
        assert!(c.fetch_offsets("idle", None).is_empty());
        // After the restart "g" has no members: its offset is kept for seven days from then,
        // then expires (it was committed long before; the rewrites kept its commit time).
        assert_eq!(c.maintain(later + 1000, true).await.unwrap(), Some(1));
        assert_eq!(c.maintain(later + 7 * day, true).await.unwrap(), Some(1));
        assert_eq!(
            c.maintain(later + 7 * day + 2000, true).await.unwrap(),
            Some(0)
        );
        assert!(c.fetch_offsets("g", None).is_empty());
    }

    #[tokio::test]
    async fn offsets_of_topics_no_member_reads_are_deleted_while_the_group_runs() {
        use kafka_protocol::messages::ConsumerProtocolSubscription;
        use kafka_protocol::protocol::{Encodable, StrBytes};
        let disk = MemStorage::new();
        let c = coordinator(&disk);
        c.log.create_topic("u", TopicConfig::default(), 0).unwrap();
        let subscription = |version: i16, topics: &[&str]| {
            let mut md = bytes::BytesMut::new();
            md.extend_from_slice(&version.to_be_bytes());
            ConsumerProtocolSubscription::default()
                .with_topics(
                    topics
                        .iter()
                        .map(|t| StrBytes::from_string(t.to_string()))
                        .collect(),
                )
                .encode(&mut md, version.min(3))
                .unwrap();
            md.freeze()
        };
        let t0 = Instant::now();
        // One member reads "t" (a subscription of a version newer than this build knows).
        let a = ready(join_with(&c, "", subscription(7, &["t"]), t0))
            .unwrap()
            .unwrap();
        let _ = ready(c.sync("g", 1, (&a.member_id, None), vec![], t0));
        let offset = |topic: &str| {
            (
                topic.to_string(),
                0,
                Committed {
                    offset: 4,
                    leader_epoch: -1,
                    metadata: None,
                },
            )
        };
        c.commit(
            "g",
            1,
            (&a.member_id, None),
            vec![offset("t"), offset("u")],
            t0,
        )
        .await
        .unwrap();
        let both = || vec![("t".to_string(), vec![0]), ("u".to_string(), vec![0])];
        let results = c.delete_offsets("g", both()).await.unwrap();
        assert_eq!(
            results[0].1,
            vec![(0, Err(GroupError::GroupSubscribedToTopic))]
        );
        assert_eq!(results[1].1, vec![(0, Ok(()))]);
        let left: Vec<String> = c
            .fetch_offsets("g", None)
            .into_iter()
            .filter(|(_, parts)| parts.iter().any(|(_, c)| c.is_some()))
            .map(|(t, _)| t)
            .collect();
        assert_eq!(left, ["t"]);
        // A member whose subscription does not parse counts as reading every topic.
        let _joining = join_with(&c, "", Bytes::from_static(b"\x00"), t0);
        let results = c.delete_offsets("g", both()).await.unwrap();
        assert!(
            results
                .iter()
                .all(|(_, r)| r[0].1 == Err(GroupError::GroupSubscribedToTopic)),
            "{results:?}"
        );
    }

    #[tokio::test]
    async fn a_group_is_deleted_only_without_members_and_stays_deleted() {
        let disk = MemStorage::new();
        let c = coordinator(&disk);
        let t0 = Instant::now();
        let a = ready(join(&c, "", t0)).unwrap().unwrap();
        let _ = ready(c.sync("g", 1, (&a.member_id, None), vec![], t0));
        let commit = vec![(
            "t".to_string(),
            1,
            Committed {
                offset: 4,
                leader_epoch: -1,
                metadata: None,
            },
        )];
        c.commit("g", 1, (&a.member_id, None), commit.clone(), t0)
            .await
            .unwrap();
        c.commit("idle", -1, ("", None), commit, t0).await.unwrap();
        assert_eq!(c.delete_group("g").await, Err(GroupError::NonEmptyGroup));
        // Offsets go one by one only from groups without members.
        let t1 = || vec![("t".to_string(), vec![1]), ("nope".to_string(), vec![0])];
        let results = c.delete_offsets("g", t1()).await.unwrap();
        assert_eq!(
            results[0].1,
            vec![(1, Err(GroupError::GroupSubscribedToTopic))]
        );
        assert_eq!(
            results[1].1,
            vec![(0, Err(GroupError::UnknownTopicOrPartition))]
        );
        assert_eq!(
            c.delete_offsets("nope", t1()).await,
            Err(GroupError::GroupIdNotFound)
        );
        assert_eq!(
            c.delete_group("nope").await,
            Err(GroupError::GroupIdNotFound)
        );
        assert_eq!(c.delete_group("").await, Err(GroupError::InvalidGroupId));
        c.commit(
            "idle",
            -1,
            ("", None),
            vec![(
                "t".to_string(),
                2,
                Committed {
                    offset: 8,
                    leader_epoch: -1,
                    metadata: None,
                },
            )],
            t0,
        )
        .await
        .unwrap();
        let results = c.delete_offsets("idle", t1()).await.unwrap();
        assert_eq!(results[0].1, vec![(1, Ok(()))]);
        let left = c.fetch_offsets("idle", None);
        assert_eq!(left[0].1.iter().map(|(p, _)| *p).collect::<Vec<_>>(), [2]);
        assert_eq!(c.delete_group("idle").await, Ok(()));
        assert!(c.fetch_offsets("idle", None).is_empty());
        assert!(c.describe("idle").is_none());
        assert_eq!(
            c.delete_group("idle").await,
            Err(GroupError::GroupIdNotFound)
        );
        // Once its member left, "g" goes too; neither comes back after a restart.
        assert_eq!(
            c.leave("g", &[(a.member_id.clone(), None)], t0),
            vec![Ok(())]
        );
        assert_eq!(c.delete_group("g").await, Ok(()));
        drop(c);
        let c = coordinator(&disk.restart(spate_log::mem::Unsynced::Drop));
        assert!(c.fetch_offsets("g", None).is_empty());
        assert!(c.fetch_offsets("idle", None).is_empty());
        assert!(c.list().is_empty());
    }

    /// An acknowledged change to the committed offsets, for the crash test's model.
    #[derive(Debug, Clone)]
    enum Change {
        Set(&'static str, u32, i64),
        DeleteGroup(&'static str),
    }

    type Model = BTreeMap<(&'static str, u32), i64>;

    fn apply(model: &mut Model, change: &Change) {
        match change {
            Change::Set(g, p, o) => {
                model.insert((g, *p), *o);
            }
            Change::DeleteGroup(g) => model.retain(|(group, _), _| group != g),
        }
    }

    /// Commits to a group with a member and to one without, writes the offsets again every few
    /// commits (small segments, so that segments are deleted) and deletes a group. Stops at the
    /// first failure, which it returns with the change it was making.
    async fn offsets_workload(
        disk: &MemStorage,
        acked: &mut Vec<Change>,
    ) -> Result<(), Option<Change>> {
        let log = Log::open(
            Arc::new(disk.clone()),
            std::path::Path::new("/d"),
            LogConfig::default(),
        )
        .map_err(|_| None)?;
        let log = Arc::new(log);
        let small = TopicConfig {
            partitions: 1,
            segment_bytes: 4096,
            max_message_bytes: 1024,
            ..TopicConfig::default()
        };
        log.create_topic(OFFSETS_TOPIC, small, 0)
            .map_err(|_| None)?;
        let t = TopicConfig {
            partitions: 3,
            ..TopicConfig::default()
        };
        log.create_topic("t", t, 0).map_err(|_| None)?;
        let c = Coordinator::open(log, Duration::ZERO, 0).map_err(|_| None)?;
        let t0 = Instant::now();
        let a = ready(join(&c, "", t0)).unwrap().unwrap();
        let _ = ready(c.sync("g", 1, (&a.member_id, None), vec![], t0));
        for i in 0..24u32 {
            let (group, generation, member) = if i % 3 == 0 {
                ("solo", -1, "")
            } else {
                ("g", 1, a.member_id.as_str())
            };
            let change = Change::Set(group, i % 3, i64::from(i));
            let committed = Committed {
                offset: i64::from(i),
                leader_epoch: -1,
                metadata: Some("m".repeat(200)),
            };
            let r = c
                .commit(
                    group,
                    generation,
                    (member, None),
                    vec![("t".into(), i % 3, committed)],
                    t0,
                )
                .await;
            match r {
                Ok(results) if results.iter().all(Result::is_ok) => acked.push(change),
                _ => return Err(Some(change)),
            }
            if i % 8 == 7 {
                c.maintain(crate::now_ms(), true).await.map_err(|_| None)?;
            }
            if i == 16 {
                let change = Change::DeleteGroup("solo");
                match c.delete_group("solo").await {
                    Ok(()) => acked.push(change),
                    Err(_) => return Err(Some(change)),
                }
            }
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_crash_at_any_sync_point_keeps_every_acknowledged_offset_change() {
        let disk = MemStorage::new();
        offsets_workload(&disk, &mut Vec::new()).await.unwrap();
        let sync_points = disk.syncs();
        assert!(sync_points > 30, "the workload synced {sync_points} times");
        // The rewrites deleted segments: the crashes below fall among deletions too.
        let log = Log::open(
            Arc::new(disk.restart(spate_log::mem::Unsynced::Drop)),
            std::path::Path::new("/d"),
            LogConfig::default(),
        )
        .unwrap();
        let start = log.topic(OFFSETS_TOPIC).unwrap().partitions[0].log_start_offset();
        assert!(start > 0, "no segment was deleted");
        for crash_at in 1..=sync_points {
            for unsynced in [
                spate_log::mem::Unsynced::Drop,
                spate_log::mem::Unsynced::KeepRandomPrefix(crash_at),
            ] {
                let disk = MemStorage::new();
                disk.crash_at_sync(crash_at);
                let mut acked = Vec::new();
                let failed = offsets_workload(&disk, &mut acked)
                    .await
                    .expect_err("the crash surfaces as a failure");
                let mut model = Model::new();
                for change in &acked {
                    apply(&mut model, change);
                }
                // The change under way at the crash may or may not have stuck.
                let mut maybe = model.clone();
                if let Some(change) = &failed {
                    apply(&mut maybe, change);
                }
                let after = disk.restart(unsynced);
                let Ok(log) = Log::open(
                    Arc::new(after),
                    std::path::Path::new("/d"),
                    LogConfig::default(),
                ) else {
                    panic!("the log does not open after a crash at sync point {crash_at}");
                };
                let Ok(c) = Coordinator::open(Arc::new(log), Duration::ZERO, 0) else {
                    panic!("offsets unreadable after a crash at sync point {crash_at}");
                };
                let mut found = Model::new();
                for group in ["g", "solo"] {
                    for (_, partitions) in c.fetch_offsets(group, None) {
                        for (p, committed) in partitions {
                            found.insert((group, p), committed.unwrap().offset);
                        }
                    }
                }
                assert!(
                    found == model || found == maybe,
                    "crash at sync point {crash_at}: found {found:?}, acknowledged {model:?}"
                );
            }
        }
    }

    fn join(c: &Coordinator, member: &str, now: Instant) -> oneshot::Receiver<JoinResult> {
        join_with(c, member, Bytes::from_static(b"md"), now)
    }

    /// A member of group "g" joining with this "range" subscription metadata.
    fn join_with(
        c: &Coordinator,
        member: &str,
        metadata: Bytes,
        now: Instant,
    ) -> oneshot::Receiver<JoinResult> {
        c.join(
            JoinRequest {
                group_id: "g".into(),
                member_id: member.into(),
                instance_id: None,
                skip_assignment_supported: true,
                client_id: "c".into(),
                client_host: "h".into(),
                protocol_type: "consumer".into(),
                protocols: vec![("range".into(), metadata)],
                session_timeout: Duration::from_secs(10),
                rebalance_timeout: Duration::from_secs(5),
            },
            now,
        )
    }

    fn ready<T>(mut rx: oneshot::Receiver<T>) -> Option<T> {
        rx.try_recv().ok()
    }

    fn join_static(
        c: &Coordinator,
        member: &str,
        instance: &str,
        metadata: &'static [u8],
        skip_assignment_supported: bool,
        now: Instant,
    ) -> oneshot::Receiver<JoinResult> {
        c.join(
            JoinRequest {
                group_id: "g".into(),
                member_id: member.into(),
                instance_id: Some(instance.into()),
                skip_assignment_supported,
                client_id: "c".into(),
                client_host: "h".into(),
                protocol_type: "consumer".into(),
                protocols: vec![("range".into(), Bytes::from_static(metadata))],
                session_timeout: Duration::from_secs(10),
                rebalance_timeout: Duration::from_secs(5),
            },
            now,
        )
    }

    #[test]
    fn a_static_member_that_restarts_takes_its_place_without_a_rebalance() {
        let disk = MemStorage::new();
        let c = coordinator(&disk);
        let t0 = Instant::now();
        // Two static members form a stable generation.
        let a = ready(join_static(&c, "", "ia", b"md", true, t0))
            .unwrap()
            .unwrap();
        assert!(a.member_id.starts_with("ia-"), "{}", a.member_id);
        let b_rx = join_static(&c, "", "ib", b"md", true, t0);
        let leader = ready(join_static(&c, &a.member_id, "ia", b"md", true, t0))
            .unwrap()
            .unwrap();
        let follower = ready(b_rx).unwrap().unwrap();
        assert_eq!((leader.generation, follower.generation), (2, 2));
        assert_eq!(leader.leader, leader.member_id);
        let follower_sync = c.sync("g", 2, (&follower.member_id, None), vec![], t0);
        let _ = ready(c.sync(
            "g",
            2,
            (&leader.member_id, None),
            vec![
                (leader.member_id.clone(), Bytes::from_static(b"p0")),
                (follower.member_id.clone(), Bytes::from_static(b"p1")),
            ],
            t0,
        ));
        assert_eq!(
            ready(follower_sync).unwrap().unwrap().2,
            Bytes::from_static(b"p1")
        );
        let instance = |m: &Joined| m.member_id.split('-').next().unwrap().to_string();
        let (li, fi) = (instance(&leader), instance(&follower));

        // The follower restarts: answered at once, same generation, its old assignment; the
        // leader's heartbeat sees no rebalance.
        let f2 = ready(join_static(&c, "", &fi, b"md", true, t0))
            .expect("answered without a rebalance")
            .unwrap();
        assert_ne!(f2.member_id, follower.member_id);
        assert_eq!(f2.generation, 2);
        assert_eq!(f2.leader, leader.member_id);
        assert!(f2.members.is_empty() && !f2.skip_assignment);
        assert_eq!(c.heartbeat("g", 2, (&leader.member_id, None), t0), Ok(()));
        let s = ready(c.sync("g", 2, (&f2.member_id, Some(&fi)), vec![], t0));
        assert_eq!(s.unwrap().unwrap().2, Bytes::from_static(b"p1"));
        assert_eq!(c.describe("g").unwrap().state, GroupState::Stable);

        // The replaced member is fenced wherever it names its instance id, unknown otherwise.
        let old = follower.member_id.as_str();
        assert_eq!(
            c.heartbeat("g", 2, (old, Some(&fi)), t0),
            Err(GroupError::FencedInstanceId)
        );
        assert_eq!(
            c.heartbeat("g", 2, (old, None), t0),
            Err(GroupError::UnknownMemberId)
        );
        assert_eq!(
            ready(c.sync("g", 2, (old, Some(&fi)), vec![], t0)).unwrap(),
            Err(GroupError::FencedInstanceId)
        );
        let commit = vec![(
            "t".to_string(),
            0,
            Committed {
                offset: 1,
                leader_epoch: -1,
                metadata: None,
            },
        )];
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        assert_eq!(
            rt.block_on(c.commit("g", 2, (old, Some(&fi)), commit, t0)),
            Err(GroupError::FencedInstanceId)
        );
        assert_eq!(
            ready(join_static(&c, old, &fi, b"md", true, t0))
                .unwrap()
                .unwrap_err()
                .0,
            GroupError::FencedInstanceId
        );

        // The leader restarts: a client that knows skip_assignment learns it leads, with the
        // members, and must not assign; an older client is given the old leader id instead.
        let l2 = ready(join_static(&c, "", &li, b"md", true, t0))
            .unwrap()
            .unwrap();
        assert_eq!(l2.generation, 2);
        assert_eq!(l2.leader, l2.member_id);
        assert!(l2.skip_assignment);
        assert_eq!(l2.members.len(), 2);
        let l3 = ready(join_static(&c, "", &li, b"md", false, t0))
            .unwrap()
            .unwrap();
        assert_eq!(
            (l3.leader.as_str(), l3.skip_assignment),
            (l2.member_id.as_str(), false)
        );
        assert!(l3.members.is_empty());
        let s = ready(c.sync("g", 2, (&l3.member_id, Some(&li)), vec![], t0));
        assert_eq!(s.unwrap().unwrap().2, Bytes::from_static(b"p0"));

        // A restart with another subscription rebalances.
        let f3_rx = join_static(&c, "", &fi, b"other topics", true, t0);
        assert_eq!(
            c.heartbeat("g", 2, (&l3.member_id, None), t0),
            Err(GroupError::RebalanceInProgress)
        );
        let l4 = ready(join_static(&c, &l3.member_id, &li, b"md", true, t0))
            .unwrap()
            .unwrap();
        let f3 = ready(f3_rx).unwrap().unwrap();
        assert_eq!((l4.generation, f3.generation), (3, 3));

        // Leaving by instance id: the member id may be left out, a wrong one is fenced.
        assert_eq!(
            c.leave(
                "g",
                &[
                    ("someone".into(), Some(fi.clone())),
                    (String::new(), Some("nobody".into())),
                    (String::new(), Some(fi.clone())),
                ],
                t0
            ),
            vec![
                Err(GroupError::FencedInstanceId),
                Err(GroupError::UnknownMemberId),
                Ok(())
            ]
        );
        let members: Vec<Option<String>> = c
            .describe("g")
            .unwrap()
            .members
            .into_iter()
            .map(|m| m.instance_id)
            .collect();
        assert_eq!(members, vec![Some(li)]);
    }

    #[test]
    fn two_members_rebalance_fence_stale_generations_and_expire() {
        let disk = MemStorage::new();
        let c = coordinator(&disk);
        let t0 = Instant::now();
        // The first member forms generation 1 alone.
        let a = ready(join(&c, "", t0)).unwrap().unwrap();
        assert_eq!((a.generation, a.leader.as_str()), (1, a.member_id.as_str()));
        assert_eq!(a.members.len(), 1);
        let s = ready(c.sync(
            "g",
            1,
            (&a.member_id, None),
            vec![(a.member_id.clone(), Bytes::from_static(b"all"))],
            t0,
        ));
        assert_eq!(s.unwrap().unwrap().2, Bytes::from_static(b"all"));
        // A second member joins: the first learns of the rebalance from its heartbeat.
        let b_rx = join(&c, "", t0);
        assert_eq!(
            c.heartbeat("g", 1, (&a.member_id, None), t0),
            Err(GroupError::RebalanceInProgress)
        );
        let a2 = ready(join(&c, &a.member_id, t0)).unwrap().unwrap();
        let b = ready(b_rx).unwrap().unwrap();
        assert_eq!((a2.generation, b.generation), (2, 2));
        assert_eq!(a2.members.len(), 2, "the leader sees every member");
        assert!(b.members.is_empty());
        // The follower waits for the leader's assignment.
        let b_sync = c.sync("g", 2, (&b.member_id, None), vec![], t0);
        let a_sync = c.sync(
            "g",
            2,
            (&a.member_id, None),
            vec![
                (a.member_id.clone(), Bytes::from_static(b"p0")),
                (b.member_id.clone(), Bytes::from_static(b"p1")),
            ],
            t0,
        );
        assert_eq!(ready(a_sync).unwrap().unwrap().2, Bytes::from_static(b"p0"));
        assert_eq!(ready(b_sync).unwrap().unwrap().2, Bytes::from_static(b"p1"));
        // A stale generation is fenced.
        assert_eq!(
            c.heartbeat("g", 1, (&a.member_id, None), t0),
            Err(GroupError::IllegalGeneration)
        );
        assert_eq!(
            c.heartbeat("g", 2, ("nobody", None), t0),
            Err(GroupError::UnknownMemberId)
        );
        assert_eq!(c.heartbeat("g", 2, (&b.member_id, None), t0), Ok(()));
        // b stops heartbeating; after its session a rebalance leaves a alone in generation 3.
        let t1 = t0 + Duration::from_secs(8);
        assert_eq!(c.heartbeat("g", 2, (&a.member_id, None), t1), Ok(()));
        let t2 = t0 + Duration::from_secs(11);
        c.tick(t2);
        assert_eq!(
            c.heartbeat("g", 2, (&a.member_id, None), t2),
            Err(GroupError::RebalanceInProgress)
        );
        let a3 = ready(join(&c, &a.member_id, t2)).unwrap().unwrap();
        assert_eq!((a3.generation, a3.members.len()), (3, 1));
        assert_eq!(
            c.heartbeat("g", 3, (&b.member_id, None), t2),
            Err(GroupError::UnknownMemberId)
        );
    }

    #[test]
    fn an_empty_group_waits_the_initial_delay_for_more_members() {
        let disk = MemStorage::new();
        let c = coordinator_gathering(&disk, Duration::from_millis(300));
        let t0 = Instant::now();
        let mut a_rx = join(&c, "", t0);
        c.tick(t0 + Duration::from_millis(100));
        assert!(a_rx.try_recv().is_err(), "answered before the delay");
        let b_rx = join(&c, "", t0 + Duration::from_millis(200));
        c.tick(t0 + Duration::from_millis(299));
        assert!(a_rx.try_recv().is_err(), "answered before the delay");
        c.tick(t0 + Duration::from_millis(300));
        let a = ready(a_rx).unwrap().unwrap();
        let b = ready(b_rx).unwrap().unwrap();
        assert_eq!((a.generation, b.generation), (1, 1));
        assert_eq!(
            a.members.len().max(b.members.len()),
            2,
            "one generation for both"
        );
        // Without a delay a lone member is answered at once.
        let c = coordinator_gathering(&MemStorage::new(), Duration::ZERO);
        let a = ready(join(&c, "", t0)).unwrap().unwrap();
        assert_eq!((a.generation, a.members.len()), (1, 1));
    }

    #[test]
    fn a_member_that_does_not_rejoin_is_dropped_at_the_rebalance_deadline() {
        let disk = MemStorage::new();
        let c = coordinator(&disk);
        let t0 = Instant::now();
        let a = ready(join(&c, "", t0)).unwrap().unwrap();
        let _ = ready(c.sync("g", 1, (&a.member_id, None), vec![], t0));
        let b_rx = join(&c, "", t0);
        // a never rejoins; after the rebalance timeout b forms the group alone.
        c.tick(t0 + Duration::from_secs(4));
        let mut b_rx = b_rx;
        assert!(b_rx.try_recv().is_err());
        c.tick(t0 + Duration::from_secs(6));
        let b = b_rx.try_recv().unwrap().unwrap();
        assert_eq!(
            (b.generation, b.members.len(), b.leader == b.member_id),
            (2, 1, true)
        );
    }

    #[tokio::test]
    async fn committed_offsets_survive_a_restart_and_stale_commits_are_refused() {
        let disk = MemStorage::new();
        let c = coordinator(&disk);
        let t0 = Instant::now();
        let a = ready(join(&c, "", t0)).unwrap().unwrap();
        let commit = |offset| {
            vec![
                (
                    "t".to_string(),
                    0,
                    Committed {
                        offset,
                        leader_epoch: -1,
                        metadata: None,
                    },
                ),
                (
                    "nope".to_string(),
                    0,
                    Committed {
                        offset,
                        leader_epoch: -1,
                        metadata: None,
                    },
                ),
            ]
        };
        assert_eq!(
            c.commit("g", 1, (&a.member_id, None), commit(5), t0).await,
            Err(GroupError::RebalanceInProgress)
        );
        let _ = ready(c.sync("g", 1, (&a.member_id, None), vec![], t0));
        let r = c
            .commit("g", 1, (&a.member_id, None), commit(5), t0)
            .await
            .unwrap();
        assert_eq!(r, vec![Ok(()), Err(GroupError::UnknownTopicOrPartition)]);
        assert_eq!(
            c.commit("g", 0, (&a.member_id, None), commit(9), t0).await,
            Err(GroupError::IllegalGeneration)
        );
        assert_eq!(
            c.commit("g", 1, ("x", None), commit(9), t0).await,
            Err(GroupError::UnknownMemberId)
        );
        assert_eq!(
            c.commit("g", -1, ("", None), commit(9), t0).await,
            Err(GroupError::IllegalGeneration)
        );
        // Simple commits outside group management work for groups without members.
        assert!(
            c.commit("solo", -1, ("", None), commit(3), t0)
                .await
                .is_ok()
        );
        drop(c);
        let c = coordinator(&disk.restart(spate_log::mem::Unsynced::Drop));
        let got = c.fetch_offsets("g", Some(vec![("t".into(), vec![0, 1])]));
        assert_eq!(got[0].1[0].1.as_ref().map(|c| c.offset), Some(5));
        assert_eq!(got[0].1[1].1, None);
        assert_eq!(
            c.fetch_offsets("solo", None)[0].1[0]
                .1
                .as_ref()
                .map(|c| c.offset),
            Some(3)
        );
        assert_eq!(c.list().len(), 2);

        // A topic deleted and created again under its name has nothing committed, as Kafka
        // deletes a deleted topic's offsets; commits to the new topic count.
        c.log.delete_topic("t").unwrap();
        c.log.create_topic("t", TopicConfig::default(), 0).unwrap();
        let got = c.fetch_offsets("g", Some(vec![("t".into(), vec![0])]));
        assert_eq!(got[0].1[0].1, None);
        assert!(c.fetch_offsets("solo", None).is_empty());
        assert!(
            c.commit("solo", -1, ("", None), commit(7), t0)
                .await
                .is_ok()
        );
        let got = c.fetch_offsets("solo", None);
        assert_eq!(got[0].1[0].1.as_ref().map(|c| c.offset), Some(7));
        // Records stored before the topic's creation time was kept count for the topic found.
        let old: StoredOffset =
            serde_json::from_str(r#"{"offset":5,"leader_epoch":-1,"metadata":null}"#).unwrap();
        assert_eq!(
            (
                old.committed.offset,
                old.topic_created_ms,
                c.current("t", &old).is_some()
            ),
            (5, None, true)
        );
    }
}
