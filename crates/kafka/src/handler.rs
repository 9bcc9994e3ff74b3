//! Request handling: decode, dispatch to the broker, encode. Every Kafka error code the listener
//! returns is chosen in this file.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::api_versions_response::ApiVersion;
use kafka_protocol::messages::create_partitions_response::CreatePartitionsTopicResult;
use kafka_protocol::messages::create_topics_response::CreatableTopicResult;
use kafka_protocol::messages::delete_groups_response::DeletableGroupResult;
use kafka_protocol::messages::delete_records_response::{
    DeleteRecordsPartitionResult, DeleteRecordsTopicResult,
};
use kafka_protocol::messages::delete_topics_response::DeletableTopicResult;
use kafka_protocol::messages::describe_configs_response::{
    DescribeConfigsResourceResult, DescribeConfigsResult,
};
use kafka_protocol::messages::describe_groups_response::{DescribedGroup, DescribedGroupMember};
use kafka_protocol::messages::describe_log_dirs_response::{
    DescribeLogDirsPartition, DescribeLogDirsResult, DescribeLogDirsTopic,
};
use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::find_coordinator_response::Coordinator as CoordinatorEntry;
use kafka_protocol::messages::join_group_response::JoinGroupResponseMember;
use kafka_protocol::messages::leave_group_response::MemberResponse;
use kafka_protocol::messages::list_groups_response::ListedGroup;
use kafka_protocol::messages::list_offsets_response::{
    ListOffsetsPartitionResponse, ListOffsetsTopicResponse,
};
use kafka_protocol::messages::metadata_response::{
    MetadataResponseBroker, MetadataResponsePartition, MetadataResponseTopic,
};
use kafka_protocol::messages::offset_commit_response::{
    OffsetCommitResponsePartition, OffsetCommitResponseTopic,
};
use kafka_protocol::messages::offset_delete_response::{
    OffsetDeleteResponsePartition, OffsetDeleteResponseTopic,
};
use kafka_protocol::messages::offset_fetch_response::{
    OffsetFetchResponseGroup, OffsetFetchResponsePartition, OffsetFetchResponsePartitions,
    OffsetFetchResponseTopic, OffsetFetchResponseTopics,
};
use kafka_protocol::messages::produce_response::{PartitionProduceResponse, TopicProduceResponse};
use kafka_protocol::messages::{AlterConfigsRequest, AlterConfigsResponse};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsResponse, BrokerId, CreateTopicsRequest, CreateTopicsResponse,
    DeleteTopicsRequest, DeleteTopicsResponse, FetchRequest, FetchResponse, ListOffsetsRequest,
    ListOffsetsResponse, MetadataRequest, MetadataResponse, ProduceRequest, ProduceResponse,
    RequestHeader, RequestKind, ResponseHeader, ResponseKind, TopicName,
};
use kafka_protocol::messages::{CreatePartitionsRequest, CreatePartitionsResponse};
use kafka_protocol::messages::{DeleteGroupsRequest, DeleteGroupsResponse};
use kafka_protocol::messages::{DeleteRecordsRequest, DeleteRecordsResponse};
use kafka_protocol::messages::{DescribeConfigsRequest, DescribeConfigsResponse};
use kafka_protocol::messages::{
    DescribeGroupsRequest, DescribeGroupsResponse, FindCoordinatorRequest, FindCoordinatorResponse,
    GroupId, HeartbeatResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest,
    LeaveGroupResponse, ListGroupsResponse, OffsetCommitRequest, OffsetCommitResponse,
    OffsetFetchRequest, OffsetFetchResponse, SyncGroupRequest, SyncGroupResponse,
};
use kafka_protocol::messages::{DescribeLogDirsRequest, DescribeLogDirsResponse};
use kafka_protocol::messages::{IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse};
use kafka_protocol::messages::{InitProducerIdRequest, InitProducerIdResponse, ProducerId};
use kafka_protocol::messages::{OffsetDeleteRequest, OffsetDeleteResponse};
use kafka_protocol::messages::{SaslAuthenticateRequest, SaslAuthenticateResponse};
use kafka_protocol::messages::{SaslHandshakeRequest, SaslHandshakeResponse};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use spate_broker::auth::Access;
use spate_broker::compressed::CompressedError;
use spate_broker::groups::{Committed, Coordinator, GroupError, JoinRequest};
use spate_broker::{Broker, BrokerError};
use spate_log::{Appended, Error as LogError, Partition, TopicConfig};

use crate::out::Chunks;
use crate::{KafkaConfig, Reply};

/// Kafka error codes used here (Kafka's protocol guide, "Error Codes").
pub mod code {
    pub const NONE: i16 = 0;
    pub const UNKNOWN_SERVER_ERROR: i16 = -1;
    pub const OFFSET_OUT_OF_RANGE: i16 = 1;
    pub const CORRUPT_MESSAGE: i16 = 2;
    pub const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
    pub const MESSAGE_TOO_LARGE: i16 = 10;
    pub const OFFSET_METADATA_TOO_LARGE: i16 = 12;
    pub const INVALID_TOPIC_EXCEPTION: i16 = 17;
    pub const RECORD_LIST_TOO_LARGE: i16 = 18;
    pub const INVALID_REQUIRED_ACKS: i16 = 21;
    pub const UNSUPPORTED_VERSION: i16 = 35;
    pub const TOPIC_ALREADY_EXISTS: i16 = 36;
    pub const INVALID_PARTITIONS: i16 = 37;
    pub const INVALID_REPLICATION_FACTOR: i16 = 38;
    pub const INVALID_REPLICA_ASSIGNMENT: i16 = 39;
    pub const INVALID_CONFIG: i16 = 40;
    pub const INVALID_REQUEST: i16 = 42;
    pub const UNSUPPORTED_FOR_MESSAGE_FORMAT: i16 = 43;
    pub const KAFKA_STORAGE_ERROR: i16 = 56;
    pub const COORDINATOR_NOT_AVAILABLE: i16 = 15;
    pub const ILLEGAL_GENERATION: i16 = 22;
    pub const INCONSISTENT_GROUP_PROTOCOL: i16 = 23;
    pub const INVALID_GROUP_ID: i16 = 24;
    pub const UNKNOWN_MEMBER_ID: i16 = 25;
    pub const INVALID_COMMIT_OFFSET_SIZE: i16 = 28;
    pub const INVALID_SESSION_TIMEOUT: i16 = 26;
    pub const REBALANCE_IN_PROGRESS: i16 = 27;
    pub const NON_EMPTY_GROUP: i16 = 68;
    pub const GROUP_ID_NOT_FOUND: i16 = 69;
    pub const GROUP_MAX_SIZE_REACHED: i16 = 81;
    pub const UNSUPPORTED_SASL_MECHANISM: i16 = 33;
    pub const ILLEGAL_SASL_STATE: i16 = 34;
    pub const SASL_AUTHENTICATION_FAILED: i16 = 58;
    pub const FENCED_INSTANCE_ID: i16 = 82;
    pub const GROUP_SUBSCRIBED_TO_TOPIC: i16 = 86;
    pub const OUT_OF_ORDER_SEQUENCE_NUMBER: i16 = 45;
    pub const INVALID_PRODUCER_EPOCH: i16 = 47;
    pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;
    pub const TOPIC_AUTHORIZATION_FAILED: i16 = 29;
    pub const GROUP_AUTHORIZATION_FAILED: i16 = 30;
    pub const CLUSTER_AUTHORIZATION_FAILED: i16 = 31;
}

/// The Kafka error code for a group error.
fn group_code(e: GroupError) -> i16 {
    match e {
        GroupError::UnknownMemberId => code::UNKNOWN_MEMBER_ID,
        GroupError::IllegalGeneration => code::ILLEGAL_GENERATION,
        GroupError::RebalanceInProgress => code::REBALANCE_IN_PROGRESS,
        GroupError::InconsistentGroupProtocol => code::INCONSISTENT_GROUP_PROTOCOL,
        GroupError::InvalidSessionTimeout => code::INVALID_SESSION_TIMEOUT,
        GroupError::GroupMaxSizeReached => code::GROUP_MAX_SIZE_REACHED,
        GroupError::CoordinatorNotAvailable => code::COORDINATOR_NOT_AVAILABLE,
        GroupError::UnknownTopicOrPartition => code::UNKNOWN_TOPIC_OR_PARTITION,
        GroupError::GroupIdNotFound => code::GROUP_ID_NOT_FOUND,
        GroupError::InvalidGroupId => code::INVALID_GROUP_ID,
        GroupError::OffsetMetadataTooLarge => code::OFFSET_METADATA_TOO_LARGE,
        GroupError::NonEmptyGroup => code::NON_EMPTY_GROUP,
        GroupError::GroupSubscribedToTopic => code::GROUP_SUBSCRIBED_TO_TOPIC,
        GroupError::InvalidCommitOffsetSize => code::INVALID_COMMIT_OFFSET_SIZE,
        GroupError::FencedInstanceId => code::FENCED_INSTANCE_ID,
    }
}

/// The node id Spate answers as: one node is the whole cluster.
const NODE_ID: i32 = 0;
/// The longest a Fetch may wait for data, whatever the client asks.
const FETCH_WAIT_MAX: Duration = Duration::from_secs(30);
/// Bytes one Fetch response carries at most, whatever the client asks.
const FETCH_BYTES_MAX: u64 = 64 << 20;

/// The APIs and versions this listener implements. Produce and Fetch stop below the versions that
/// address topics by id (13); ListOffsets below MAX_TIMESTAMP lookups (7).
pub const APIS: &[(ApiKey, i16, i16)] = &[
    (ApiKey::Produce, 3, 12),
    (ApiKey::Fetch, 4, 12),
    (ApiKey::ListOffsets, 1, 6),
    (ApiKey::Metadata, 0, 12),
    (ApiKey::ApiVersions, 0, 4),
    (ApiKey::CreateTopics, 2, 7),
    (ApiKey::DeleteTopics, 1, 6),
    (ApiKey::FindCoordinator, 0, 6),
    (ApiKey::JoinGroup, 0, 9),
    (ApiKey::SyncGroup, 0, 5),
    (ApiKey::Heartbeat, 0, 4),
    (ApiKey::LeaveGroup, 0, 5),
    (ApiKey::OffsetCommit, 2, 8),
    (ApiKey::OffsetFetch, 1, 8),
    (ApiKey::ListGroups, 0, 4),
    (ApiKey::DescribeGroups, 0, 5),
    (ApiKey::InitProducerId, 0, 4),
    (ApiKey::DescribeConfigs, 1, 4),
    (ApiKey::DeleteGroups, 0, 2),
    (ApiKey::OffsetDelete, 0, 0),
    (ApiKey::AlterConfigs, 0, 2),
    (ApiKey::DeleteRecords, 0, 2),
    (ApiKey::CreatePartitions, 0, 3),
    (ApiKey::DescribeLogDirs, 1, 4),
    (ApiKey::IncrementalAlterConfigs, 0, 1),
    // Version 0 of SaslHandshake is followed by raw SASL bytes outside Kafka's framing: only 1.
    (ApiKey::SaslHandshake, 1, 1),
    (ApiKey::SaslAuthenticate, 0, 2),
];

fn supported(key: ApiKey, version: i16) -> bool {
    APIS.iter()
        .any(|(k, lo, hi)| *k == key && (*lo..=*hi).contains(&version))
}

pub struct Context {
    pub broker: Arc<Broker>,
    pub coordinator: Arc<Coordinator>,
    pub config: Arc<KafkaConfig>,
    /// The client's address, shown in group descriptions.
    pub peer: String,
    /// Where the connection stands in SASL authentication (with access tokens).
    pub sasl: Sasl,
}

/// A connection's SASL state: nothing yet, PLAIN chosen (SaslHandshake), authenticated (with a
/// full or a read-only token), or failed (the connection closes after the answer).
#[derive(Default)]
pub struct Sasl(std::sync::atomic::AtomicU8);

const SASL_NONE: u8 = 0;
const SASL_PLAIN: u8 = 1;
const SASL_DONE: u8 = 2;
const SASL_FAILED: u8 = 3;
const SASL_READ_ONLY: u8 = 4;

/// The message of requests a read-only token may not make.
const READ_ONLY: &str = "this access token is read-only: it may read and consume, not write or \
                         change what the server holds";

impl Sasl {
    fn get(&self) -> u8 {
        self.0.load(std::sync::atomic::Ordering::Acquire)
    }

    fn set(&self, state: u8) {
        self.0.store(state, std::sync::atomic::Ordering::Release);
    }

    /// Whether authentication failed: the connection is to close once the answer is sent.
    pub fn failed(&self) -> bool {
        self.get() == SASL_FAILED
    }

    fn authenticated(&self) -> bool {
        matches!(self.get(), SASL_DONE | SASL_READ_ONLY)
    }

    /// Whether the connection authenticated with a read-only token: it may read and consume
    /// (Fetch, consumer groups, offsets) but not produce, create, delete or alter.
    fn read_only(&self) -> bool {
        self.get() == SASL_READ_ONLY
    }
}

/// SaslHandshake: only PLAIN is offered, and only with access tokens configured.
fn sasl_handshake(ctx: &Context, r: SaslHandshakeRequest) -> SaslHandshakeResponse {
    let plain = vec![StrBytes::from_static_str("PLAIN")];
    if ctx.config.auth.is_none() {
        return SaslHandshakeResponse::default().with_error_code(code::ILLEGAL_SASL_STATE);
    }
    if ctx.sasl.get() != SASL_NONE {
        return SaslHandshakeResponse::default()
            .with_error_code(code::ILLEGAL_SASL_STATE)
            .with_mechanisms(plain);
    }
    if r.mechanism.as_str() != "PLAIN" {
        return SaslHandshakeResponse::default()
            .with_error_code(code::UNSUPPORTED_SASL_MECHANISM)
            .with_mechanisms(plain);
    }
    ctx.sasl.set(SASL_PLAIN);
    SaslHandshakeResponse::default().with_mechanisms(plain)
}

/// SaslAuthenticate with PLAIN (RFC 4616: `[authzid] NUL authcid NUL passwd`): the password must
/// be one of the access tokens; the user name is only logged.
fn sasl_authenticate(ctx: &Context, r: SaslAuthenticateRequest) -> SaslAuthenticateResponse {
    let fail = |code: i16, why: &str| {
        ctx.sasl.set(SASL_FAILED);
        SaslAuthenticateResponse::default()
            .with_error_code(code)
            .with_error_message(Some(StrBytes::from_string(why.to_string())))
    };
    let Some(tokens) = &ctx.config.auth else {
        return SaslAuthenticateResponse::default()
            .with_error_code(code::ILLEGAL_SASL_STATE)
            .with_error_message(Some(StrBytes::from_static_str(
                "this listener does not authenticate",
            )));
    };
    if ctx.sasl.get() != SASL_PLAIN {
        return fail(
            code::ILLEGAL_SASL_STATE,
            "SaslAuthenticate before SaslHandshake chose PLAIN",
        );
    }
    let parts: Vec<&[u8]> = r.auth_bytes.split(|b| *b == 0).collect();
    let [authzid, user, password] = parts[..] else {
        return fail(
            code::SASL_AUTHENTICATION_FAILED,
            "Authentication failed: malformed PLAIN credentials",
        );
    };
    if !authzid.is_empty() && authzid != user {
        return fail(
            code::SASL_AUTHENTICATION_FAILED,
            "Authentication failed: authorization id differs from the user name",
        );
    }
    let Some(access) = tokens.access(password) else {
        // The name as given, cut short: it is the client's text.
        let user = String::from_utf8_lossy(&user[..user.len().min(128)]);
        tracing::info!(peer = %ctx.peer, %user, "kafka authentication failed");
        return fail(
            code::SASL_AUTHENTICATION_FAILED,
            "Authentication failed: invalid credentials",
        );
    };
    ctx.sasl.set(match access {
        Access::Full => SASL_DONE,
        Access::ReadOnly => SASL_READ_ONLY,
    });
    SaslAuthenticateResponse::default()
}

fn encode_response(
    correlation_id: i32,
    header_version: i16,
    body: &ResponseKind,
    version: i16,
) -> anyhow::Result<Vec<Bytes>> {
    let mut head = BytesMut::with_capacity(256);
    head.put_i32(0);
    ResponseHeader::default()
        .with_correlation_id(correlation_id)
        .encode(&mut head, header_version)?;
    let rest = match body {
        // A fetch's record batches are referenced, not copied (see `out`).
        ResponseKind::Fetch(f) => {
            let shared = f
                .responses
                .iter()
                .flat_map(|t| t.partitions.iter().filter_map(|p| p.records.clone()))
                .filter(|r| !r.is_empty())
                .collect();
            let mut out = Chunks::new(shared);
            kafka_protocol::protocol::Encodable::encode(f, &mut out, version)?;
            out.finish()
        }
        other => {
            other.encode(&mut head, version)?;
            Vec::new()
        }
    };
    let total = head.len() - 4 + rest.iter().map(Bytes::len).sum::<usize>();
    let size = i32::try_from(total).context("response too large")?;
    head[0..4].copy_from_slice(&size.to_be_bytes());
    let mut chunks = Vec::with_capacity(1 + rest.len());
    chunks.push(head.freeze());
    chunks.extend(rest);
    Ok(chunks)
}

fn api_versions(error_code: i16) -> ApiVersionsResponse {
    ApiVersionsResponse::default()
        .with_error_code(error_code)
        .with_api_keys(
            APIS.iter()
                .map(|(k, lo, hi)| {
                    ApiVersion::default()
                        .with_api_key(*k as i16)
                        .with_min_version(*lo)
                        .with_max_version(*hi)
                })
                .collect(),
        )
}

/// A request frame, taken apart.
pub enum Decoded {
    /// A request this listener implements.
    Request {
        api: ApiKey,
        version: i16,
        header: RequestHeader,
        body: Box<RequestKind>,
    },
    /// An API key or version this listener does not implement.
    Unsupported {
        api: Option<ApiKey>,
        key: i16,
        version: i16,
        correlation_id: i32,
    },
}

/// Decodes one request frame. Pure; an `Err` means the input is not a Kafka request.
pub fn decode(mut frame: Bytes) -> anyhow::Result<Decoded> {
    if frame.len() < 8 {
        bail!("request of {} bytes is too short for a header", frame.len());
    }
    let key = i16::from_be_bytes([frame[0], frame[1]]);
    let version = i16::from_be_bytes([frame[2], frame[3]]);
    let correlation_id = i32::from_be_bytes([frame[4], frame[5], frame[6], frame[7]]);
    let api = ApiKey::try_from(key).ok();
    let Some(api) = api.filter(|a| supported(*a, version)) else {
        return Ok(Decoded::Unsupported {
            api,
            key,
            version,
            correlation_id,
        });
    };
    let header = RequestHeader::decode(&mut frame, api.request_header_version(version))
        .context("invalid request header")?;
    let body = RequestKind::decode(api, &mut frame, version).context("invalid request body")?;
    if frame.has_remaining() {
        tracing::debug!(
            ?api,
            trailing = frame.remaining(),
            "request has trailing bytes"
        );
    }
    Ok(Decoded::Request {
        api,
        version,
        header,
        body: Box::new(body),
    })
}

/// Handles one request frame. An `Err` closes the connection (undecodable input).
pub async fn handle(ctx: &Context, frame: Bytes) -> anyhow::Result<Reply> {
    let (api, version, header, request) = match decode(frame)? {
        Decoded::Request {
            api,
            version,
            header,
            body,
        } => (api, version, header, *body),
        Decoded::Unsupported {
            api,
            key,
            version,
            correlation_id,
        } => {
            // ApiVersions newer than ours is answered at v0 with our versions, so the client can
            // pick one it shares with us; anything else unknown gets the bare error code.
            if api == Some(ApiKey::ApiVersions) {
                let body = ResponseKind::ApiVersions(api_versions(code::UNSUPPORTED_VERSION));
                return Ok(Reply::Ready(encode_response(correlation_id, 0, &body, 0)?));
            }
            tracing::debug!(key, version, "unsupported api key or version");
            let mut out = BytesMut::with_capacity(10);
            out.put_i32(6);
            out.put_i32(correlation_id);
            out.put_i16(code::UNSUPPORTED_VERSION);
            return Ok(Reply::Ready(vec![out.freeze()]));
        }
    };
    let header_version = api.response_header_version(version);
    let id = header.correlation_id;
    // With access tokens, nothing but version discovery and SASL before authentication: the
    // connection closes, as Kafka's does.
    if ctx.config.auth.is_some()
        && !ctx.sasl.authenticated()
        && !matches!(
            request,
            RequestKind::ApiVersions(_)
                | RequestKind::SaslHandshake(_)
                | RequestKind::SaslAuthenticate(_)
        )
    {
        bail!("{api:?} from {} before SASL authentication", ctx.peer);
    }
    let body = match request {
        RequestKind::SaslHandshake(r) => ResponseKind::SaslHandshake(sasl_handshake(ctx, r)),
        RequestKind::SaslAuthenticate(r) => {
            ResponseKind::SaslAuthenticate(sasl_authenticate(ctx, r))
        }
        RequestKind::ApiVersions(_) => ResponseKind::ApiVersions(api_versions(code::NONE)),
        RequestKind::Metadata(r) => ResponseKind::Metadata(metadata(ctx, r, version).await),
        RequestKind::CreateTopics(r) => ResponseKind::CreateTopics(create_topics(ctx, r).await),
        RequestKind::DeleteTopics(r) => ResponseKind::DeleteTopics(delete_topics(ctx, r).await),
        RequestKind::ListOffsets(r) => ResponseKind::ListOffsets(list_offsets(ctx, r).await),
        RequestKind::Fetch(r) => ResponseKind::Fetch(fetch(ctx, r).await),
        RequestKind::Produce(r) => return produce(ctx, r, id, header_version, version).await,
        RequestKind::FindCoordinator(r) => {
            ResponseKind::FindCoordinator(find_coordinator(ctx, r, version))
        }
        RequestKind::JoinGroup(r) => {
            ResponseKind::JoinGroup(join_group(ctx, r, &header, version).await)
        }
        RequestKind::SyncGroup(r) => ResponseKind::SyncGroup(sync_group(ctx, r).await),
        RequestKind::Heartbeat(r) => ResponseKind::Heartbeat(
            HeartbeatResponse::default().with_error_code(
                ctx.coordinator
                    .heartbeat(
                        r.group_id.0.as_str(),
                        r.generation_id,
                        (r.member_id.as_str(), r.group_instance_id.as_deref()),
                        Instant::now(),
                    )
                    .err()
                    .map_or(code::NONE, group_code),
            ),
        ),
        RequestKind::LeaveGroup(r) => ResponseKind::LeaveGroup(leave_group(ctx, r, version)),
        RequestKind::OffsetCommit(r) => ResponseKind::OffsetCommit(offset_commit(ctx, r).await),
        RequestKind::OffsetFetch(r) => ResponseKind::OffsetFetch(offset_fetch(ctx, r, version)),
        RequestKind::ListGroups(_) => ResponseKind::ListGroups(list_groups(ctx)),
        RequestKind::DescribeGroups(r) => ResponseKind::DescribeGroups(describe_groups(ctx, r)),
        RequestKind::InitProducerId(r) => ResponseKind::InitProducerId(init_producer_id(ctx, r)),
        RequestKind::DescribeConfigs(r) => ResponseKind::DescribeConfigs(describe_configs(ctx, r)),
        RequestKind::AlterConfigs(r) => ResponseKind::AlterConfigs(alter_configs(ctx, r).await),
        RequestKind::DeleteRecords(r) => ResponseKind::DeleteRecords(delete_records(ctx, r).await),
        RequestKind::CreatePartitions(r) => {
            ResponseKind::CreatePartitions(create_partitions(ctx, r))
        }
        RequestKind::DescribeLogDirs(r) => {
            ResponseKind::DescribeLogDirs(describe_log_dirs(ctx, r).await)
        }
        RequestKind::IncrementalAlterConfigs(r) => {
            ResponseKind::IncrementalAlterConfigs(incremental_alter_configs(ctx, r).await)
        }
        RequestKind::DeleteGroups(r) => ResponseKind::DeleteGroups(delete_groups(ctx, r).await),
        RequestKind::OffsetDelete(r) => ResponseKind::OffsetDelete(offset_delete(ctx, r).await),
        other => bail!("request {other:?} passed the version check but has no handler"),
    };
    Ok(Reply::Ready(encode_response(
        id,
        header_version,
        &body,
        version,
    )?))
}

fn name_of(t: &TopicName) -> &str {
    t.0.as_str()
}

fn str_bytes(s: &str) -> StrBytes {
    StrBytes::from_string(s.to_string())
}

/// The Kafka error code for a broker error.
fn error_code(e: &BrokerError) -> i16 {
    match e {
        BrokerError::Log(e) => match e {
            LogError::UnknownTopic(_) | LogError::UnknownPartition { .. } => {
                code::UNKNOWN_TOPIC_OR_PARTITION
            }
            LogError::TopicExists(_) => code::TOPIC_ALREADY_EXISTS,
            LogError::InvalidTopicName { .. } => code::INVALID_TOPIC_EXCEPTION,
            LogError::InvalidConfig(m) if m.contains("partitions") => code::INVALID_PARTITIONS,
            LogError::InvalidConfig(_) => code::INVALID_CONFIG,
            LogError::OffsetOutOfRange { .. } => code::OFFSET_OUT_OF_RANGE,
            LogError::BatchTooLarge { .. } => code::MESSAGE_TOO_LARGE,
            LogError::InvalidBatch(spate_log::batch::BatchError::Magic(_)) => {
                code::UNSUPPORTED_FOR_MESSAGE_FORMAT
            }
            LogError::InvalidBatch(_) => code::CORRUPT_MESSAGE,
            LogError::Poisoned { .. } | LogError::Io { .. } | LogError::Corrupt { .. } => {
                code::KAFKA_STORAGE_ERROR
            }
            LogError::Metadata { .. } | LogError::NotAtOffset { .. } => code::UNKNOWN_SERVER_ERROR,
            LogError::OutOfOrderSequence { .. } => code::OUT_OF_ORDER_SEQUENCE_NUMBER,
            LogError::InvalidProducerEpoch { .. } => code::INVALID_PRODUCER_EPOCH,
        },
        BrokerError::InvalidEvent { .. } | BrokerError::EventTooLarge { .. } => {
            code::INVALID_REQUEST
        }
        BrokerError::Unsupported(_) | BrokerError::Internal(_) | BrokerError::Stream(_) => {
            code::UNKNOWN_SERVER_ERROR
        }
        BrokerError::InternalTopic(_) => code::INVALID_TOPIC_EXCEPTION,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, LogError> + Send + 'static,
) -> Result<T, BrokerError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| BrokerError::Internal(format!("blocking task failed: {e}")))?
        .map_err(BrokerError::from)
}

/// Looks a topic up, creating it when auto-creation is on and `create` allows.
async fn topic_for(
    ctx: &Context,
    name: &str,
    create: bool,
) -> Result<Arc<spate_log::Topic>, BrokerError> {
    match ctx.broker.topic(name) {
        Err(BrokerError::Log(LogError::UnknownTopic(_)))
            if create && ctx.config.auto_create_topics && !ctx.sasl.read_only() =>
        {
            let config = TopicConfig {
                partitions: ctx.config.default_partitions,
                ..TopicConfig::default()
            };
            match ctx.broker.create_topic(name.to_string(), config).await {
                Ok(t) => Ok(t),
                // Someone else created it meanwhile.
                Err(BrokerError::Log(LogError::TopicExists(_))) => ctx.broker.topic(name),
                Err(e) => Err(e),
            }
        }
        other => other,
    }
}

async fn metadata(ctx: &Context, r: MetadataRequest, version: i16) -> MetadataResponse {
    let names: Vec<String> = match &r.topics {
        None => ctx
            .broker
            .log()
            .topics()
            .iter()
            .map(|t| t.name.clone())
            .collect(),
        // Version 0 used an empty list for "all topics".
        Some(list) if list.is_empty() && version == 0 => ctx
            .broker
            .log()
            .topics()
            .iter()
            .map(|t| t.name.clone())
            .collect(),
        Some(list) => list
            .iter()
            .filter_map(|t| t.name.as_ref().map(|n| name_of(n).to_string()))
            .collect(),
    };
    // Versions before 4 have no flag and always allowed auto-creation.
    let create = r.allow_auto_topic_creation || version < 4;
    let mut topics = Vec::with_capacity(names.len());
    for name in names {
        let t = MetadataResponseTopic::default()
            .with_name(Some(TopicName(str_bytes(&name))))
            .with_is_internal(spate_broker::is_internal(&name));
        topics.push(match topic_for(ctx, &name, create).await {
            Ok(topic) => t.with_partitions(
                (0..topic.config().partitions as i32)
                    .map(|p| {
                        MetadataResponsePartition::default()
                            .with_partition_index(p)
                            .with_leader_id(BrokerId(NODE_ID))
                            .with_leader_epoch(0)
                            .with_replica_nodes(vec![BrokerId(NODE_ID)])
                            .with_isr_nodes(vec![BrokerId(NODE_ID)])
                    })
                    .collect(),
            ),
            Err(e) => t.with_error_code(error_code(&e)),
        });
    }
    MetadataResponse::default()
        .with_brokers(vec![
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(NODE_ID))
                .with_host(str_bytes(&ctx.config.advertised_host))
                .with_port(ctx.config.advertised_port),
        ])
        .with_cluster_id(Some(StrBytes::from_static_str("spate")))
        .with_controller_id(BrokerId(NODE_ID))
        .with_topics(topics)
}

/// A topic setting given by name and value in CreateTopics, AlterConfigs or
/// IncrementalAlterConfigs.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Setting {
    RetentionMs(Option<u64>),
    RetentionBytes(Option<u64>),
    SegmentBytes(u64),
    SegmentMs(u64),
    MaxMessageBytes(u64),
    /// Accepted and meaningless here: `cleanup.policy=delete` (the only policy), and settings
    /// about replicas and timestamps that change nothing on one node.
    Ignored,
}

impl Setting {
    fn apply(self, c: &mut TopicConfig) {
        match self {
            Setting::RetentionMs(v) => c.retention_ms = v,
            Setting::RetentionBytes(v) => c.retention_bytes = v,
            Setting::SegmentBytes(v) => c.segment_bytes = v,
            Setting::SegmentMs(v) => c.segment_ms = v,
            Setting::MaxMessageBytes(v) => c.max_message_bytes = v,
            Setting::Ignored => {}
        }
    }
}

/// Parses a topic setting. A `None` value (and -1 for the retention limits) means what Kafka
/// means: no limit for retention, the default otherwise.
fn setting(name: &str, value: Option<&str>) -> Result<Setting, (i16, String)> {
    let d = TopicConfig::default();
    let bad = || {
        (
            code::INVALID_CONFIG,
            format!("invalid value {:?} for {name}", value.unwrap_or_default()),
        )
    };
    // A limit: -1 for none, else a positive number.
    let limit = |default: Option<u64>| -> Result<Option<u64>, (i16, String)> {
        match value {
            None => Ok(default),
            Some("-1") => Ok(None),
            Some(v) => v.parse::<u64>().map(Some).map_err(|_| bad()),
        }
    };
    let number = |default: u64| -> Result<u64, (i16, String)> {
        value.map_or(Ok(default), |v| v.parse::<u64>().map_err(|_| bad()))
    };
    Ok(match name {
        "retention.ms" => Setting::RetentionMs(limit(d.retention_ms)?),
        "retention.bytes" => Setting::RetentionBytes(limit(d.retention_bytes)?),
        "segment.bytes" => Setting::SegmentBytes(number(d.segment_bytes)?),
        "segment.ms" => Setting::SegmentMs(number(d.segment_ms)?),
        "max.message.bytes" => Setting::MaxMessageBytes(number(d.max_message_bytes)?),
        "cleanup.policy" if value.is_none_or(|v| v == "delete") => Setting::Ignored,
        "min.insync.replicas" | "unclean.leader.election.enable" => Setting::Ignored,
        "message.timestamp.type" if value != Some("LogAppendTime") => Setting::Ignored,
        other => {
            return Err((
                code::INVALID_CONFIG,
                format!(
                    "unsupported topic config {other}={}",
                    value.unwrap_or_default()
                ),
            ));
        }
    })
}

/// Maps CreateTopics configs onto a topic configuration.
fn topic_config(
    ctx: &Context,
    t: &kafka_protocol::messages::create_topics_request::CreatableTopic,
) -> Result<TopicConfig, (i16, String)> {
    let mut c = TopicConfig {
        partitions: if t.num_partitions == -1 {
            ctx.config.default_partitions
        } else {
            u32::try_from(t.num_partitions).map_err(|_| {
                (
                    code::INVALID_PARTITIONS,
                    "partitions must be positive".to_string(),
                )
            })?
        },
        ..TopicConfig::default()
    };
    if !(t.replication_factor == -1 || t.replication_factor == 1) {
        return Err((
            code::INVALID_REPLICATION_FACTOR,
            "this server keeps one replica: use replication factor 1 or -1".into(),
        ));
    }
    if !t.assignments.is_empty() {
        return Err((
            code::INVALID_REPLICA_ASSIGNMENT,
            "manual replica assignment is not supported".into(),
        ));
    }
    for cfg in &t.configs {
        let value = cfg.value.as_ref().map(|v| v.as_str());
        setting(cfg.name.as_str(), value)?.apply(&mut c);
    }
    Ok(c)
}

async fn create_topics(ctx: &Context, r: CreateTopicsRequest) -> CreateTopicsResponse {
    let mut results = Vec::with_capacity(r.topics.len());
    for t in &r.topics {
        let name = name_of(&t.name).to_string();
        let result = CreatableTopicResult::default().with_name(t.name.clone());
        let config = if ctx.sasl.read_only() {
            Err((code::TOPIC_AUTHORIZATION_FAILED, READ_ONLY.to_string()))
        } else {
            topic_config(ctx, t)
        };
        let outcome = match config {
            Err(e) => Err(e),
            Ok(config) => {
                let partitions = config.partitions;
                let checked = config
                    .validate()
                    .and_then(|()| spate_log::config::validate_topic_name(&name))
                    .map_err(BrokerError::from);
                match checked {
                    Err(e) => Err((error_code(&e), e.to_string())),
                    Ok(()) if r.validate_only => match ctx.broker.topic(&name) {
                        Ok(_) => Err((
                            code::TOPIC_ALREADY_EXISTS,
                            format!("topic {name} already exists"),
                        )),
                        Err(_) => Ok(partitions),
                    },
                    Ok(()) => ctx
                        .broker
                        .create_topic(name.clone(), config)
                        .await
                        .map(|_| partitions)
                        .map_err(|e| (error_code(&e), e.to_string())),
                }
            }
        };
        results.push(match outcome {
            Ok(partitions) => result
                .with_num_partitions(partitions as i32)
                .with_replication_factor(1),
            Err((code, message)) => result
                .with_error_code(code)
                .with_error_message(Some(str_bytes(&message)))
                .with_num_partitions(-1)
                .with_replication_factor(-1),
        });
    }
    CreateTopicsResponse::default().with_topics(results)
}

async fn delete_topics(ctx: &Context, r: DeleteTopicsRequest) -> DeleteTopicsResponse {
    let names: Vec<Option<TopicName>> = if r.topics.is_empty() {
        r.topic_names.into_iter().map(Some).collect()
    } else {
        r.topics.into_iter().map(|t| t.name).collect()
    };
    let mut results = Vec::with_capacity(names.len());
    for name in names {
        let result = DeletableTopicResult::default().with_name(name.clone());
        let Some(name) = name else {
            results.push(
                result
                    .with_error_code(code::UNKNOWN_TOPIC_OR_PARTITION)
                    .with_error_message(Some(StrBytes::from_static_str(
                        "topic ids are not supported; give the name",
                    ))),
            );
            continue;
        };
        if ctx.sasl.read_only() {
            results.push(
                result
                    .with_error_code(code::TOPIC_AUTHORIZATION_FAILED)
                    .with_error_message(Some(StrBytes::from_static_str(READ_ONLY))),
            );
            continue;
        }
        results.push(
            match ctx.broker.delete_topic(name_of(&name).to_string()).await {
                Ok(()) => result,
                Err(e) => result
                    .with_error_code(error_code(&e))
                    .with_error_message(Some(str_bytes(&e.to_string()))),
            },
        );
    }
    DeleteTopicsResponse::default().with_responses(results)
}

fn partition_of(topic: &spate_log::Topic, index: i32) -> Result<Arc<Partition>, BrokerError> {
    u32::try_from(index)
        .map_err(|_| {
            BrokerError::Log(LogError::UnknownPartition {
                topic: topic.name.clone(),
                partition: 0,
            })
        })
        .and_then(|i| Ok(topic.partition(i)?.clone()))
}

async fn list_offsets(ctx: &Context, r: ListOffsetsRequest) -> ListOffsetsResponse {
    let mut topics = Vec::with_capacity(r.topics.len());
    for t in r.topics {
        let topic = ctx.broker.topic(name_of(&t.name));
        let mut partitions = Vec::with_capacity(t.partitions.len());
        for p in t.partitions {
            let response =
                ListOffsetsPartitionResponse::default().with_partition_index(p.partition_index);
            let found = match &topic {
                Err(e) => Err(error_code(e)),
                Ok(topic) => match partition_of(topic, p.partition_index) {
                    Err(e) => Err(error_code(&e)),
                    Ok(partition) => match p.timestamp {
                        -1 => Ok((partition.high_watermark() as i64, -1)),
                        -2 => Ok((partition.log_start_offset() as i64, -1)),
                        ts if ts >= 0 => blocking(move || partition.offset_for_timestamp(ts))
                            .await
                            .map(|found| found.map_or((-1, -1), |(o, t)| (o as i64, t)))
                            .map_err(|e| error_code(&e)),
                        _ => Err(code::UNSUPPORTED_VERSION),
                    },
                },
            };
            partitions.push(match found {
                Ok((offset, timestamp)) => response.with_offset(offset).with_timestamp(timestamp),
                Err(c) => response
                    .with_error_code(c)
                    .with_offset(-1)
                    .with_timestamp(-1),
            });
        }
        topics.push(
            ListOffsetsTopicResponse::default()
                .with_name(t.name)
                .with_partitions(partitions),
        );
    }
    ListOffsetsResponse::default().with_topics(topics)
}

/// One partition of a fetch, resolved once.
struct FetchSlot {
    topic_index: usize,
    partition: Result<Arc<Partition>, i16>,
    index: i32,
    offset: i64,
    max_bytes: u64,
}

/// A partition's part of a fetch response before its offsets and records are known.
fn empty_partition_data(index: i32) -> PartitionData {
    PartitionData::default()
        .with_partition_index(index)
        .with_high_watermark(-1)
        .with_last_stable_offset(-1)
        .with_log_start_offset(-1)
        .with_preferred_read_replica(BrokerId(-1))
        .with_aborted_transactions(Some(Vec::new()))
}

/// One pass of a fetch over its partitions, reading up to `max_bytes` in all (blocking when a
/// partition has data): each partition's part, the bytes read, and whether any part is an error.
fn fetch_round(slots: &[FetchSlot], max_bytes: u64) -> (Vec<PartitionData>, u64, bool) {
    let mut parts: Vec<PartitionData> = Vec::with_capacity(slots.len());
    let mut total = 0u64;
    let mut errors = false;
    for s in slots {
        let data = empty_partition_data(s.index);
        let p = match &s.partition {
            Err(c) => {
                errors = true;
                parts.push(data.with_error_code(*c));
                continue;
            }
            Ok(p) => p,
        };
        let hw = p.high_watermark() as i64;
        let start = p.log_start_offset() as i64;
        let data = data
            .with_high_watermark(hw)
            .with_last_stable_offset(hw)
            .with_log_start_offset(start);
        if s.offset < start || s.offset > hw {
            errors = true;
            parts.push(data.with_error_code(code::OFFSET_OUT_OF_RANGE));
            continue;
        }
        // The first partition with data gets at least one whole batch even past max_bytes.
        let budget = s.max_bytes.min(max_bytes.saturating_sub(total));
        if s.offset == hw || (budget == 0 && total > 0) {
            parts.push(data.with_records(Some(Bytes::new())));
            continue;
        }
        parts.push(match p.read(s.offset as u64, budget.max(1)) {
            Ok(bytes) => {
                total += bytes.len() as u64;
                data.with_records(Some(Bytes::from(bytes)))
            }
            Err(e) => {
                errors = true;
                data.with_error_code(error_code(&BrokerError::from(e)))
            }
        });
    }
    (parts, total, errors)
}

async fn fetch(ctx: &Context, r: FetchRequest) -> FetchResponse {
    let mut slots = Vec::new();
    let mut names = Vec::with_capacity(r.topics.len());
    for (ti, t) in r.topics.iter().enumerate() {
        names.push(t.topic.clone());
        let topic = ctx.broker.topic(name_of(&t.topic));
        for p in &t.partitions {
            slots.push(FetchSlot {
                topic_index: ti,
                partition: match &topic {
                    Err(e) => Err(error_code(e)),
                    Ok(topic) => partition_of(topic, p.partition).map_err(|e| error_code(&e)),
                },
                index: p.partition,
                offset: p.fetch_offset,
                max_bytes: p.partition_max_bytes.max(0) as u64,
            });
        }
    }
    let slots = Arc::new(slots);
    let wait = Duration::from_millis(r.max_wait_ms.max(0) as u64).min(FETCH_WAIT_MAX);
    let deadline = tokio::time::Instant::now() + wait;
    let min_bytes = r.min_bytes.max(0) as u64;
    let max_bytes = (r.max_bytes.max(0) as u64).min(FETCH_BYTES_MAX);
    loop {
        // Subscribe before reading, so an append between the read and the wait is not missed.
        let mut watches: Vec<_> = slots
            .iter()
            .filter_map(|s| s.partition.as_ref().ok())
            .map(|p| {
                let mut rx = ctx.broker.watch(p);
                rx.borrow_and_update();
                rx
            })
            .collect();
        // The reads of all partitions run in one blocking task (none when there is nothing to
        // read): a thread hand-off per partition cost more than the reads of data just written.
        let any_data = slots.iter().any(|s| {
            s.partition.as_ref().is_ok_and(|p| {
                let o = s.offset as u64;
                o >= p.log_start_offset() && o < p.high_watermark()
            })
        });
        let (parts, total, errors) = if any_data {
            let round = slots.clone();
            match blocking(move || Ok(fetch_round(&round, max_bytes))).await {
                Ok(r) => r,
                Err(e) => {
                    let c = error_code(&e);
                    let failed = slots
                        .iter()
                        .map(|s| empty_partition_data(s.index).with_error_code(c))
                        .collect();
                    (failed, 0, true)
                }
            }
        } else {
            fetch_round(&slots, max_bytes)
        };
        let now = tokio::time::Instant::now();
        if total >= min_bytes.max(1) || errors || now >= deadline || watches.is_empty() {
            let mut responses: Vec<FetchableTopicResponse> = names
                .iter()
                .map(|n| FetchableTopicResponse::default().with_topic(n.clone()))
                .collect();
            for (s, data) in slots.iter().zip(parts) {
                responses[s.topic_index].partitions.push(data);
            }
            return FetchResponse::default().with_responses(responses);
        }
        let changed =
            futures_util::future::select_all(watches.iter_mut().map(|rx| Box::pin(rx.changed())));
        let _ = tokio::time::timeout_at(deadline, changed).await;
    }
}

/// Resource types of DescribeConfigs.
const RESOURCE_TOPIC: i8 = 2;
const RESOURCE_BROKER: i8 = 4;
/// Config sources: set on the topic (Kafka's DYNAMIC_TOPIC_CONFIG), or a default.
const SOURCE_TOPIC: i8 = 1;
const SOURCE_DEFAULT: i8 = 5;
/// Config types (KIP-569): 3 = INT, 5 = LONG, 2 = STRING... as Kafka numbers them.
const TYPE_BOOLEAN: i8 = 1;
const TYPE_STRING: i8 = 2;
const TYPE_INT: i8 = 3;
const TYPE_LONG: i8 = 5;

fn describe_configs(ctx: &Context, r: DescribeConfigsRequest) -> DescribeConfigsResponse {
    let opt = |v: Option<u64>| v.map_or("-1".to_string(), |v| v.to_string());
    let results = r
        .resources
        .into_iter()
        .map(|res| {
            let result = DescribeConfigsResult::default()
                .with_resource_type(res.resource_type)
                .with_resource_name(res.resource_name.clone());
            let entries: Vec<(&str, String, i8, i8)> = match res.resource_type {
                RESOURCE_TOPIC => match ctx.broker.topic(res.resource_name.as_str()) {
                    Err(e) => {
                        return result
                            .with_error_code(error_code(&e))
                            .with_error_message(Some(str_bytes(&e.to_string())));
                    }
                    Ok(t) => {
                        let (c, d) = (t.config(), TopicConfig::default());
                        // Settings that differ from the defaults were given to the topic.
                        let source = |set: bool| if set { SOURCE_TOPIC } else { SOURCE_DEFAULT };
                        vec![
                            (
                                "cleanup.policy",
                                "delete".into(),
                                TYPE_STRING,
                                SOURCE_DEFAULT,
                            ),
                            (
                                "retention.ms",
                                opt(c.retention_ms),
                                TYPE_LONG,
                                source(c.retention_ms != d.retention_ms),
                            ),
                            (
                                "retention.bytes",
                                opt(c.retention_bytes),
                                TYPE_LONG,
                                source(c.retention_bytes != d.retention_bytes),
                            ),
                            (
                                "segment.bytes",
                                c.segment_bytes.to_string(),
                                TYPE_INT,
                                source(c.segment_bytes != d.segment_bytes),
                            ),
                            (
                                "segment.ms",
                                c.segment_ms.to_string(),
                                TYPE_LONG,
                                source(c.segment_ms != d.segment_ms),
                            ),
                            (
                                "max.message.bytes",
                                c.max_message_bytes.to_string(),
                                TYPE_INT,
                                source(c.max_message_bytes != d.max_message_bytes),
                            ),
                            ("min.insync.replicas", "1".into(), TYPE_INT, SOURCE_DEFAULT),
                            (
                                "message.timestamp.type",
                                "CreateTime".into(),
                                TYPE_STRING,
                                SOURCE_DEFAULT,
                            ),
                        ]
                    }
                },
                RESOURCE_BROKER => {
                    let d = TopicConfig::default();
                    vec![
                        (
                            "auto.create.topics.enable",
                            ctx.config.auto_create_topics.to_string(),
                            TYPE_BOOLEAN,
                            SOURCE_DEFAULT,
                        ),
                        (
                            "num.partitions",
                            ctx.config.default_partitions.to_string(),
                            TYPE_INT,
                            SOURCE_DEFAULT,
                        ),
                        (
                            "log.retention.ms",
                            opt(d.retention_ms),
                            TYPE_LONG,
                            SOURCE_DEFAULT,
                        ),
                        (
                            "log.segment.bytes",
                            d.segment_bytes.to_string(),
                            TYPE_INT,
                            SOURCE_DEFAULT,
                        ),
                        (
                            "message.max.bytes",
                            d.max_message_bytes.to_string(),
                            TYPE_INT,
                            SOURCE_DEFAULT,
                        ),
                        (
                            "socket.request.max.bytes",
                            ctx.config.max_request_bytes.to_string(),
                            TYPE_INT,
                            SOURCE_DEFAULT,
                        ),
                    ]
                }
                other => {
                    return result
                        .with_error_code(code::INVALID_REQUEST)
                        .with_error_message(Some(str_bytes(&format!(
                            "resource type {other} is not supported"
                        ))));
                }
            };
            // No keys (null or an empty list) asks for every setting, as in Kafka.
            let wanted = res.configuration_keys.as_ref().filter(|k| !k.is_empty());
            result.with_configs(
                entries
                    .into_iter()
                    .filter(|(name, ..)| {
                        wanted.is_none_or(|keys| keys.iter().any(|k| k.as_str() == *name))
                    })
                    .map(|(name, value, config_type, source)| {
                        DescribeConfigsResourceResult::default()
                            .with_name(str_bytes(name))
                            .with_value(Some(str_bytes(&value)))
                            .with_read_only(false)
                            .with_config_source(source)
                            .with_config_type(config_type)
                    })
                    .collect(),
            )
        })
        .collect();
    DescribeConfigsResponse::default().with_results(results)
}

/// DeleteRecords: moves each partition's log start to the offset given (-1: the high watermark).
async fn delete_records(ctx: &Context, r: DeleteRecordsRequest) -> DeleteRecordsResponse {
    let mut topics = Vec::with_capacity(r.topics.len());
    for t in r.topics {
        let name = name_of(&t.name).to_string();
        let mut partitions = Vec::with_capacity(t.partitions.len());
        for p in t.partitions {
            let result = DeleteRecordsPartitionResult::default()
                .with_partition_index(p.partition_index)
                .with_low_watermark(-1);
            let outcome = match (u32::try_from(p.partition_index), p.offset) {
                _ if ctx.sasl.read_only() => Err(code::TOPIC_AUTHORIZATION_FAILED),
                (Err(_), _) => Err(code::UNKNOWN_TOPIC_OR_PARTITION),
                (Ok(id), -1) => ctx
                    .broker
                    .delete_records(&name, id, None)
                    .await
                    .map_err(|e| error_code(&e)),
                (Ok(id), o) => match u64::try_from(o) {
                    Ok(o) => ctx
                        .broker
                        .delete_records(&name, id, Some(o))
                        .await
                        .map_err(|e| error_code(&e)),
                    Err(_) => Err(code::OFFSET_OUT_OF_RANGE),
                },
            };
            partitions.push(match outcome {
                Ok(start) => result.with_low_watermark(start as i64),
                Err(code) => result.with_error_code(code),
            });
        }
        topics.push(
            DeleteRecordsTopicResult::default()
                .with_name(t.name)
                .with_partitions(partitions),
        );
    }
    DeleteRecordsResponse::default().with_topics(topics)
}

/// CreatePartitions: a topic keeps the partition count it was created with (the partition of a
/// key, and so of an event-sourcing stream, depends on it), so every request is answered with
/// `INVALID_PARTITIONS` and the reason, as Kafka answers a count that is not an increase.
fn create_partitions(ctx: &Context, r: CreatePartitionsRequest) -> CreatePartitionsResponse {
    let results = r
        .topics
        .into_iter()
        .map(|t| {
            let (code, message) = match ctx.broker.topic(name_of(&t.name)) {
                Err(e) => (error_code(&e), e.to_string()),
                Ok(topic) => {
                    let n = topic.partitions.len();
                    (
                        code::INVALID_PARTITIONS,
                        if i64::from(t.count) == n as i64 {
                            format!("topic {} already has {n} partitions", topic.name)
                        } else {
                            format!(
                                "topic {} keeps the {n} partitions it was created with: the \
                                 partition of a key, and so of a stream, depends on the count",
                                topic.name
                            )
                        },
                    )
                }
            };
            CreatePartitionsTopicResult::default()
                .with_name(t.name)
                .with_error_code(code)
                .with_error_message(Some(str_bytes(&message)))
        })
        .collect();
    CreatePartitionsResponse::default().with_results(results)
}

/// DescribeLogDirs: the data directory is the one log dir; each partition with its size on disk.
async fn describe_log_dirs(ctx: &Context, r: DescribeLogDirsRequest) -> DescribeLogDirsResponse {
    let log = ctx.broker.log();
    let wanted: Option<Vec<(String, Vec<i32>)>> = r.topics.map(|ts| {
        ts.into_iter()
            .map(|t| (name_of(&t.topic).to_string(), t.partitions))
            .collect()
    });
    let mut topics = Vec::new();
    for topic in log.topics() {
        let asked: Option<&Vec<i32>> = match &wanted {
            None => None,
            Some(w) => match w.iter().find(|(n, _)| *n == topic.name) {
                Some((_, ps)) => Some(ps),
                None => continue,
            },
        };
        let partitions: Vec<DescribeLogDirsPartition> = topic
            .partitions
            .iter()
            .filter(|p| asked.is_none_or(|ps| ps.contains(&(p.id as i32))))
            .map(|p| {
                DescribeLogDirsPartition::default()
                    .with_partition_index(p.id as i32)
                    .with_partition_size(p.info().size_bytes as i64)
            })
            .collect();
        topics.push(
            DescribeLogDirsTopic::default()
                .with_name(TopicName(str_bytes(&topic.name)))
                .with_partitions(partitions),
        );
    }
    let dir = log.dir().to_path_buf();
    let space = tokio::task::spawn_blocking(move || disk_space(&dir))
        .await
        .ok()
        .flatten();
    let (total, usable) = space.unwrap_or((-1, -1));
    DescribeLogDirsResponse::default().with_results(vec![
        DescribeLogDirsResult::default()
            .with_log_dir(str_bytes(
                &std::path::absolute(log.dir())
                    .unwrap_or_else(|_| log.dir().to_path_buf())
                    .display()
                    .to_string(),
            ))
            .with_topics(topics)
            .with_total_bytes(total)
            .with_usable_bytes(usable),
    ])
}

/// The size and the free space of the file system holding `dir`, in bytes.
#[allow(unsafe_code)]
fn disk_space(dir: &std::path::Path) -> Option<(i64, i64)> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `path` is a NUL-terminated string and `st` has room for the result, which is read
    // only when the call succeeded.
    let st = unsafe {
        if libc::statvfs(path.as_ptr(), st.as_mut_ptr()) != 0 {
            return None;
        }
        st.assume_init()
    };
    let block = st.f_frsize as i64;
    Some((st.f_blocks as i64 * block, st.f_bavail as i64 * block))
}

/// IncrementalAlterConfigs operations (KIP-339).
const OP_SET: i8 = 0;
const OP_DELETE: i8 = 1;
const OP_APPEND: i8 = 2;
const OP_SUBTRACT: i8 = 3;

/// What an alter request asks of one resource: its settings in order, and whether the
/// settings not named go back to their defaults (AlterConfigs) or stay (IncrementalAlterConfigs).
struct Alteration {
    settings: Vec<Setting>,
    reset_others: bool,
}

/// Changes one topic's settings; the result is the error code and message for the resource.
async fn alter_topic(
    ctx: &Context,
    resource_type: i8,
    name: &str,
    alteration: Result<Alteration, (i16, String)>,
    validate_only: bool,
) -> (i16, Option<String>) {
    if ctx.sasl.read_only() {
        let code = if resource_type == RESOURCE_TOPIC {
            code::TOPIC_AUTHORIZATION_FAILED
        } else {
            code::CLUSTER_AUTHORIZATION_FAILED
        };
        return (code, Some(READ_ONLY.into()));
    }
    let alteration = match (resource_type, alteration) {
        (RESOURCE_TOPIC, Ok(a)) => a,
        (RESOURCE_TOPIC, Err((code, message))) => return (code, Some(message)),
        (RESOURCE_BROKER, _) => {
            return (
                code::INVALID_REQUEST,
                Some(
                    "broker settings are set when the server starts (flags or config file)".into(),
                ),
            );
        }
        (other, _) => {
            return (
                code::INVALID_REQUEST,
                Some(format!("resource type {other} is not supported")),
            );
        }
    };
    let change = move |current: &TopicConfig| {
        let mut c = if alteration.reset_others {
            TopicConfig {
                partitions: current.partitions,
                ..TopicConfig::default()
            }
        } else {
            *current
        };
        for s in alteration.settings {
            s.apply(&mut c);
        }
        Ok(c)
    };
    match ctx
        .broker
        .alter_topic_config(name.to_string(), change, validate_only)
        .await
    {
        Ok(_) => (code::NONE, None),
        Err(e) => (error_code(&e), Some(e.to_string())),
    }
}

/// Settings named twice in one resource make the request ambiguous, as Kafka also holds.
fn unique_names<'a>(names: impl Iterator<Item = &'a str>) -> Result<(), (i16, String)> {
    let mut seen = std::collections::HashSet::new();
    for n in names {
        if !seen.insert(n) {
            return Err((code::INVALID_REQUEST, format!("config {n} is given twice")));
        }
    }
    Ok(())
}

/// Reads the settings of one resource: (name, operation, value) in request order. AlterConfigs
/// gives every setting as a SET and resets the others.
fn alteration<'a>(
    configs: impl Iterator<Item = (&'a str, i8, Option<&'a str>)> + Clone,
    reset_others: bool,
) -> Result<Alteration, (i16, String)> {
    unique_names(configs.clone().map(|(name, ..)| name))?;
    let settings = configs
        .map(|(name, op, value)| match op {
            OP_SET => setting(name, value),
            // Back to the default.
            OP_DELETE => setting(name, None),
            // The only list setting is cleanup.policy, whose only value is delete.
            OP_APPEND if name == "cleanup.policy" && value == Some("delete") => {
                Ok(Setting::Ignored)
            }
            OP_APPEND | OP_SUBTRACT => Err((
                code::INVALID_CONFIG,
                format!(
                    "{name} is not a list config that can take APPEND or SUBTRACT with {:?}",
                    value.unwrap_or_default()
                ),
            )),
            op => Err((
                code::INVALID_REQUEST,
                format!("unknown config operation {op} for {name}"),
            )),
        })
        .collect::<Result<_, _>>()?;
    Ok(Alteration {
        settings,
        reset_others,
    })
}

async fn alter_configs(ctx: &Context, r: AlterConfigsRequest) -> AlterConfigsResponse {
    let mut responses = Vec::with_capacity(r.resources.len());
    for res in r.resources {
        let configs = res.configs.iter().map(|c| {
            (
                c.name.as_str(),
                OP_SET,
                c.value.as_ref().map(|v| v.as_str()),
            )
        });
        let (error, message) = alter_topic(
            ctx,
            res.resource_type,
            res.resource_name.as_str(),
            alteration(configs, true),
            r.validate_only,
        )
        .await;
        responses.push(
            kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse::default()
                .with_resource_type(res.resource_type)
                .with_resource_name(res.resource_name)
                .with_error_code(error)
                .with_error_message(message.as_deref().map(str_bytes)),
        );
    }
    AlterConfigsResponse::default().with_responses(responses)
}

async fn incremental_alter_configs(
    ctx: &Context,
    r: IncrementalAlterConfigsRequest,
) -> IncrementalAlterConfigsResponse {
    let mut responses = Vec::with_capacity(r.resources.len());
    for res in r.resources {
        let configs = res.configs.iter().map(|c| {
            (
                c.name.as_str(),
                c.config_operation,
                c.value.as_ref().map(|v| v.as_str()),
            )
        });
        let (error, message) = alter_topic(
            ctx,
            res.resource_type,
            res.resource_name.as_str(),
            alteration(configs, false),
            r.validate_only,
        )
        .await;
        responses.push(
            kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse::default()
                .with_resource_type(res.resource_type)
                .with_resource_name(res.resource_name)
                .with_error_code(error)
                .with_error_message(message.as_deref().map(str_bytes)),
        );
    }
    IncrementalAlterConfigsResponse::default().with_responses(responses)
}

fn init_producer_id(ctx: &Context, r: InitProducerIdRequest) -> InitProducerIdResponse {
    let response = InitProducerIdResponse::default()
        .with_producer_id(ProducerId(-1))
        .with_producer_epoch(-1);
    if ctx.sasl.read_only() {
        return response.with_error_code(code::CLUSTER_AUTHORIZATION_FAILED);
    }
    if r.transactional_id.as_ref().is_some_and(|t| !t.0.is_empty()) {
        // Transactions are not offered; idempotence alone is.
        return response.with_error_code(code::TRANSACTIONAL_ID_AUTHORIZATION_FAILED);
    }
    // A producer that already has an id asks for a new epoch of it (KIP-360).
    if r.producer_id.0 >= 0 && r.producer_epoch >= 0 && r.producer_epoch < i16::MAX {
        return response
            .with_producer_id(r.producer_id)
            .with_producer_epoch(r.producer_epoch + 1);
    }
    response
        .with_producer_id(ProducerId(ctx.broker.next_producer_id()))
        .with_producer_epoch(0)
}

fn find_coordinator(
    ctx: &Context,
    r: FindCoordinatorRequest,
    version: i16,
) -> FindCoordinatorResponse {
    let host = str_bytes(&ctx.config.advertised_host);
    let port = ctx.config.advertised_port;
    // Key type 0 is a consumer group; transactions (1) are not offered.
    let error = if r.key_type == 0 {
        code::NONE
    } else {
        code::COORDINATOR_NOT_AVAILABLE
    };
    if version >= 4 {
        let coordinators = r
            .coordinator_keys
            .into_iter()
            .map(|key| {
                CoordinatorEntry::default()
                    .with_key(key)
                    .with_node_id(BrokerId(NODE_ID))
                    .with_host(host.clone())
                    .with_port(port)
                    .with_error_code(error)
            })
            .collect();
        return FindCoordinatorResponse::default().with_coordinators(coordinators);
    }
    FindCoordinatorResponse::default()
        .with_error_code(error)
        .with_node_id(BrokerId(NODE_ID))
        .with_host(host)
        .with_port(port)
}

async fn join_group(
    ctx: &Context,
    r: JoinGroupRequest,
    header: &RequestHeader,
    version: i16,
) -> JoinGroupResponse {
    let session = Duration::from_millis(r.session_timeout_ms.max(0) as u64);
    // Version 0 has no rebalance timeout: the session timeout serves for both.
    let rebalance = if version == 0 {
        session
    } else {
        Duration::from_millis(r.rebalance_timeout_ms.max(0) as u64)
    };
    let request = JoinRequest {
        group_id: r.group_id.0.to_string(),
        member_id: r.member_id.to_string(),
        instance_id: r.group_instance_id.as_ref().map(|i| i.to_string()),
        skip_assignment_supported: version >= 9,
        client_id: header
            .client_id
            .as_ref()
            .map(|c| c.to_string())
            .unwrap_or_default(),
        client_host: ctx.peer.clone(),
        protocol_type: r.protocol_type.to_string(),
        protocols: r
            .protocols
            .into_iter()
            .map(|p| (p.name.to_string(), p.metadata))
            .collect(),
        session_timeout: session,
        rebalance_timeout: rebalance,
    };
    let response = JoinGroupResponse::default().with_generation_id(-1);
    match ctx.coordinator.join(request, Instant::now()).await {
        Ok(Ok(j)) => response
            .with_generation_id(j.generation)
            .with_protocol_type(Some(str_bytes(&j.protocol_type)))
            .with_protocol_name(Some(str_bytes(&j.protocol)))
            .with_leader(str_bytes(&j.leader))
            .with_member_id(str_bytes(&j.member_id))
            .with_skip_assignment(j.skip_assignment)
            .with_members(
                j.members
                    .into_iter()
                    .map(|(id, metadata)| {
                        JoinGroupResponseMember::default()
                            .with_member_id(str_bytes(&id))
                            .with_metadata(metadata)
                    })
                    .collect(),
            ),
        Ok(Err((e, why))) => {
            tracing::debug!(error = ?e, %why, "join refused");
            response.with_error_code(group_code(e))
        }
        Err(_) => response.with_error_code(code::REBALANCE_IN_PROGRESS),
    }
}

async fn sync_group(ctx: &Context, r: SyncGroupRequest) -> SyncGroupResponse {
    let assignments = r
        .assignments
        .into_iter()
        .map(|a| (a.member_id.to_string(), a.assignment))
        .collect();
    let rx = ctx.coordinator.sync(
        r.group_id.0.as_str(),
        r.generation_id,
        (r.member_id.as_str(), r.group_instance_id.as_deref()),
        assignments,
        Instant::now(),
    );
    match rx.await {
        Ok(Ok((protocol_type, protocol, assignment))) => SyncGroupResponse::default()
            .with_protocol_type(Some(str_bytes(&protocol_type)))
            .with_protocol_name(Some(str_bytes(&protocol)))
            .with_assignment(assignment),
        Ok(Err(e)) => SyncGroupResponse::default().with_error_code(group_code(e)),
        Err(_) => SyncGroupResponse::default().with_error_code(code::REBALANCE_IN_PROGRESS),
    }
}

fn leave_group(ctx: &Context, r: LeaveGroupRequest, version: i16) -> LeaveGroupResponse {
    let now = Instant::now();
    if version < 3 {
        let result = ctx.coordinator.leave(
            r.group_id.0.as_str(),
            &[(r.member_id.to_string(), None)],
            now,
        );
        return LeaveGroupResponse::default()
            .with_error_code(result[0].err().map_or(code::NONE, group_code));
    }
    let members: Vec<(String, Option<String>)> = r
        .members
        .iter()
        .map(|m| {
            (
                m.member_id.to_string(),
                m.group_instance_id.as_ref().map(|i| i.to_string()),
            )
        })
        .collect();
    let results = ctx.coordinator.leave(r.group_id.0.as_str(), &members, now);
    LeaveGroupResponse::default().with_members(
        r.members
            .into_iter()
            .zip(results)
            .map(|(m, result)| {
                MemberResponse::default()
                    .with_member_id(m.member_id)
                    .with_group_instance_id(m.group_instance_id)
                    .with_error_code(result.err().map_or(code::NONE, group_code))
            })
            .collect(),
    )
}

async fn offset_commit(ctx: &Context, r: OffsetCommitRequest) -> OffsetCommitResponse {
    let mut offsets = Vec::new();
    for t in &r.topics {
        for p in &t.partitions {
            offsets.push((
                name_of(&t.name).to_string(),
                u32::try_from(p.partition_index).unwrap_or(u32::MAX),
                Committed {
                    offset: p.committed_offset,
                    leader_epoch: p.committed_leader_epoch,
                    metadata: p.committed_metadata.as_ref().map(|m| m.to_string()),
                },
            ));
        }
    }
    let results = ctx
        .coordinator
        .commit(
            r.group_id.0.as_str(),
            r.generation_id_or_member_epoch,
            (r.member_id.as_str(), r.group_instance_id.as_deref()),
            offsets,
            Instant::now(),
        )
        .await;
    let mut codes = match &results {
        Ok(per_partition) => per_partition
            .iter()
            .map(|r| r.err().map_or(code::NONE, group_code))
            .collect::<Vec<_>>()
            .into_iter(),
        Err(e) => {
            vec![group_code(*e); r.topics.iter().map(|t| t.partitions.len()).sum()].into_iter()
        }
    };
    let topics = r
        .topics
        .into_iter()
        .map(|t| {
            let partitions = t
                .partitions
                .iter()
                .map(|p| {
                    OffsetCommitResponsePartition::default()
                        .with_partition_index(p.partition_index)
                        .with_error_code(codes.next().unwrap_or(code::UNKNOWN_SERVER_ERROR))
                })
                .collect();
            OffsetCommitResponseTopic::default()
                .with_name(t.name)
                .with_partitions(partitions)
        })
        .collect();
    OffsetCommitResponse::default().with_topics(topics)
}

fn committed_parts(found: Vec<(u32, Option<Committed>)>) -> Vec<(i32, i64, i32, Option<StrBytes>)> {
    found
        .into_iter()
        .map(|(p, c)| match c {
            Some(c) => (
                p as i32,
                c.offset,
                c.leader_epoch,
                c.metadata.map(|m| str_bytes(&m)),
            ),
            None => (p as i32, -1, -1, Some(StrBytes::default())),
        })
        .collect()
}

fn offset_fetch(ctx: &Context, r: OffsetFetchRequest, version: i16) -> OffsetFetchResponse {
    let wanted = |topics: Option<Vec<(TopicName, Vec<i32>)>>| {
        topics.map(|ts| {
            ts.into_iter()
                .map(|(n, ps)| {
                    (
                        name_of(&n).to_string(),
                        ps.into_iter()
                            .filter_map(|p| u32::try_from(p).ok())
                            .collect(),
                    )
                })
                .collect::<Vec<(String, Vec<u32>)>>()
        })
    };
    if version >= 8 {
        let groups = r
            .groups
            .into_iter()
            .map(|g| {
                let topics = g.topics.map(|ts| {
                    ts.into_iter()
                        .map(|t| (t.name, t.partition_indexes))
                        .collect()
                });
                let found = ctx
                    .coordinator
                    .fetch_offsets(g.group_id.0.as_str(), wanted(topics));
                OffsetFetchResponseGroup::default()
                    .with_group_id(g.group_id)
                    .with_topics(
                        found
                            .into_iter()
                            .map(|(topic, parts)| {
                                OffsetFetchResponseTopics::default()
                                    .with_name(TopicName(str_bytes(&topic)))
                                    .with_partitions(
                                        committed_parts(parts)
                                            .into_iter()
                                            .map(|(p, o, e, m)| {
                                                OffsetFetchResponsePartitions::default()
                                                    .with_partition_index(p)
                                                    .with_committed_offset(o)
                                                    .with_committed_leader_epoch(e)
                                                    .with_metadata(m)
                                            })
                                            .collect(),
                                    )
                            })
                            .collect(),
                    )
            })
            .collect();
        return OffsetFetchResponse::default().with_groups(groups);
    }
    let topics = r.topics.map(|ts| {
        ts.into_iter()
            .map(|t| (t.name, t.partition_indexes))
            .collect()
    });
    let found = ctx
        .coordinator
        .fetch_offsets(r.group_id.0.as_str(), wanted(topics));
    OffsetFetchResponse::default().with_topics(
        found
            .into_iter()
            .map(|(topic, parts)| {
                OffsetFetchResponseTopic::default()
                    .with_name(TopicName(str_bytes(&topic)))
                    .with_partitions(
                        committed_parts(parts)
                            .into_iter()
                            .map(|(p, o, e, m)| {
                                OffsetFetchResponsePartition::default()
                                    .with_partition_index(p)
                                    .with_committed_offset(o)
                                    .with_committed_leader_epoch(e)
                                    .with_metadata(m)
                            })
                            .collect(),
                    )
            })
            .collect(),
    )
}

async fn delete_groups(ctx: &Context, r: DeleteGroupsRequest) -> DeleteGroupsResponse {
    let mut results = Vec::with_capacity(r.groups_names.len());
    for id in r.groups_names {
        let code = if ctx.sasl.read_only() {
            code::GROUP_AUTHORIZATION_FAILED
        } else {
            match ctx.coordinator.delete_group(id.0.as_str()).await {
                Ok(()) => code::NONE,
                Err(e) => group_code(e),
            }
        };
        results.push(
            DeletableGroupResult::default()
                .with_group_id(id)
                .with_error_code(code),
        );
    }
    DeleteGroupsResponse::default().with_results(results)
}

async fn offset_delete(ctx: &Context, r: OffsetDeleteRequest) -> OffsetDeleteResponse {
    if ctx.sasl.read_only() {
        return OffsetDeleteResponse::default().with_error_code(code::GROUP_AUTHORIZATION_FAILED);
    }
    let topics = r
        .topics
        .iter()
        .map(|t| {
            let partitions = t
                .partitions
                .iter()
                .map(|p| u32::try_from(p.partition_index).unwrap_or(u32::MAX))
                .collect();
            (name_of(&t.name).to_string(), partitions)
        })
        .collect();
    match ctx
        .coordinator
        .delete_offsets(r.group_id.0.as_str(), topics)
        .await
    {
        Err(e) => OffsetDeleteResponse::default().with_error_code(group_code(e)),
        Ok(results) => OffsetDeleteResponse::default().with_topics(
            results
                .into_iter()
                .map(|(topic, partitions)| {
                    OffsetDeleteResponseTopic::default()
                        .with_name(TopicName(str_bytes(&topic)))
                        .with_partitions(
                            partitions
                                .into_iter()
                                .map(|(p, result)| {
                                    OffsetDeleteResponsePartition::default()
                                        .with_partition_index(i32::try_from(p).unwrap_or(i32::MAX))
                                        .with_error_code(
                                            result.err().map_or(code::NONE, group_code),
                                        )
                                })
                                .collect(),
                        )
                })
                .collect(),
        ),
    }
}

fn list_groups(ctx: &Context) -> ListGroupsResponse {
    ListGroupsResponse::default().with_groups(
        ctx.coordinator
            .list()
            .into_iter()
            .map(|g| {
                ListedGroup::default()
                    .with_group_id(GroupId(str_bytes(&g.group_id)))
                    .with_protocol_type(str_bytes(&g.protocol_type))
                    .with_group_state(StrBytes::from_static_str(g.state.name()))
                    .with_group_type(StrBytes::from_static_str("classic"))
            })
            .collect(),
    )
}

fn describe_groups(ctx: &Context, r: DescribeGroupsRequest) -> DescribeGroupsResponse {
    DescribeGroupsResponse::default().with_groups(
        r.groups
            .into_iter()
            .map(|id| match ctx.coordinator.describe(id.0.as_str()) {
                None => DescribedGroup::default()
                    .with_group_id(id)
                    .with_group_state(StrBytes::from_static_str("Dead")),
                Some(g) => DescribedGroup::default()
                    .with_group_id(id)
                    .with_group_state(StrBytes::from_static_str(g.state.name()))
                    .with_protocol_type(str_bytes(&g.protocol_type))
                    .with_protocol_data(str_bytes(&g.protocol))
                    .with_members(
                        g.members
                            .into_iter()
                            .map(|m| {
                                DescribedGroupMember::default()
                                    .with_member_id(str_bytes(&m.member_id))
                                    .with_group_instance_id(m.instance_id.as_deref().map(str_bytes))
                                    .with_client_id(str_bytes(&m.client_id))
                                    .with_client_host(str_bytes(&m.client_host))
                                    .with_member_metadata(m.metadata)
                                    .with_member_assignment(m.assignment)
                            })
                            .collect(),
                    ),
            })
            .collect(),
    )
}

/// A partition's part of a produce request once written: where, or the error code.
type Written = Result<(Arc<Partition>, Appended), i16>;

async fn produce(
    ctx: &Context,
    r: ProduceRequest,
    id: i32,
    header_version: i16,
    version: i16,
) -> anyhow::Result<Reply> {
    let acks = r.acks;
    // As Kafka does: acks other than -1, 0 and 1 get INVALID_REQUIRED_ACKS for every partition,
    // and nothing is written.
    let acks_valid = matches!(acks, -1..=1);
    // A read-only token's records are refused the same way, with TOPIC_AUTHORIZATION_FAILED.
    let denied = ctx.sasl.read_only();
    // Resolve every partition first, then write them all in one blocking call, in request order;
    // durability is waited for afterwards, off the connection's path.
    type Job = (Arc<Partition>, TopicConfig, Vec<u8>);
    let mut slots: Vec<(usize, i32, Result<Job, i16>)> = Vec::new();
    let mut names = Vec::with_capacity(r.topic_data.len());
    for (ti, t) in r.topic_data.into_iter().enumerate() {
        names.push(t.name.clone());
        let topic = if acks_valid && !denied {
            Some(topic_for(ctx, name_of(&t.name), true).await)
        } else {
            None
        };
        for pd in t.partition_data {
            let job = match (&topic, pd.records) {
                (None, _) if denied => Err(code::TOPIC_AUTHORIZATION_FAILED),
                (None, _) => Err(code::INVALID_REQUIRED_ACKS),
                (Some(Err(e)), _) => Err(error_code(e)),
                // Committed offsets are written by the coordinator only.
                (Some(Ok(t)), _) if spate_broker::is_internal(&t.name) => {
                    Err(code::INVALID_TOPIC_EXCEPTION)
                }
                (Some(Ok(_)), None) => Err(code::CORRUPT_MESSAGE),
                (Some(Ok(topic)), Some(records)) => partition_of(topic, pd.index)
                    .map(|p| (p, topic.config(), records.to_vec()))
                    .map_err(|e| error_code(&e)),
            };
            slots.push((ti, pd.index, job));
        }
    }
    let now = spate_broker::now_ms();
    let started = Instant::now();
    let written: Vec<(usize, i32, Written)> = tokio::task::spawn_blocking(move || {
        slots
            .into_iter()
            .map(|(ti, index, job)| {
                let outcome = job.and_then(|(p, config, mut bytes)| {
                    // A compressed batch is stored only once it is known to decode within the
                    // bound every reader applies.
                    spate_broker::compressed::check(&bytes).map_err(|e| {
                        tracing::debug!(error = %e, "produce refused");
                        match e {
                            CompressedError::TooLarge => code::MESSAGE_TOO_LARGE,
                            CompressedError::Corrupt(_) => code::CORRUPT_MESSAGE,
                        }
                    })?;
                    match p.append_unsynced(&mut bytes, now, &config) {
                        Ok(a) => Ok((p, a)),
                        Err(e) => {
                            tracing::debug!(error = %e, "produce refused");
                            Err(error_code(&BrokerError::from(e)))
                        }
                    }
                });
                (ti, index, outcome)
            })
            .collect()
    })
    .await
    .context("produce task failed")?;
    if acks == 0 {
        // No response; the data is written and becomes durable with the next fsync.
        return Ok(Reply::None);
    }
    let broker = ctx.broker.clone();
    let handle = tokio::spawn(async move {
        let mut responses: Vec<TopicProduceResponse> = names
            .iter()
            .map(|n| TopicProduceResponse::default().with_name(n.clone()))
            .collect();
        // Wait for every partition's fsync at once: they run in parallel, and each may be shared
        // with other requests' appends (group commit).
        for (_, _, outcome) in &written {
            if let Ok((p, appended)) = outcome {
                broker.sync_soon(p, *appended);
            }
        }
        for (ti, index, outcome) in written {
            let response = PartitionProduceResponse::default()
                .with_index(index)
                .with_log_append_time_ms(-1)
                .with_log_start_offset(-1);
            let response = match outcome {
                Ok((p, appended)) => match broker.acknowledgeable(&p, appended).await {
                    Ok(()) => response
                        .with_base_offset(appended.base_offset as i64)
                        .with_log_start_offset(p.log_start_offset() as i64),
                    Err(e) => response
                        .with_error_code(error_code(&e))
                        .with_base_offset(-1),
                },
                Err(c) => response.with_error_code(c).with_base_offset(-1),
            };
            responses[ti].partition_responses.push(response);
        }
        metrics::histogram!("spate_publish_to_durable_seconds", "protocol" => "kafka")
            .record(started.elapsed().as_secs_f64());
        let body = ResponseKind::Produce(ProduceResponse::default().with_responses(responses));
        match encode_response(id, header_version, &body, version) {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::error!(error = %e, "failed to encode a produce response");
                None
            }
        }
    });
    Ok(Reply::Pending(handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetch_response_written_in_chunks_decodes_as_the_one_encoded_whole() {
        let big = Bytes::from((0..20_000u32).map(|i| i as u8).collect::<Vec<u8>>());
        let small = Bytes::from_static(b"a small batch");
        let part = |index: i32, records: Bytes| {
            empty_partition_data(index)
                .with_high_watermark(100)
                .with_records(Some(records))
        };
        let response = FetchResponse::default().with_responses(vec![
            FetchableTopicResponse::default()
                .with_topic(TopicName(StrBytes::from_static_str("t")))
                .with_partitions(vec![part(0, big.clone()), part(1, small), part(2, big)]),
        ]);
        for version in [4, 11, 12] {
            let body = ResponseKind::Fetch(response.clone());
            let chunks = encode_response(7, 0, &body, version).unwrap();
            assert!(
                chunks.len() > 1,
                "the large batches are chunks of their own"
            );
            let mut whole = BytesMut::new();
            whole.put_i32(0);
            ResponseHeader::default()
                .with_correlation_id(7)
                .encode(&mut whole, 0)
                .unwrap();
            response.encode(&mut whole, version).unwrap();
            let size = (whole.len() - 4) as i32;
            whole[0..4].copy_from_slice(&size.to_be_bytes());
            let joined: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            assert_eq!(joined, whole.to_vec(), "version {version}");
            let mut rest = Bytes::from(joined).slice(4..);
            ResponseHeader::decode(&mut rest, 0).unwrap();
            assert_eq!(FetchResponse::decode(&mut rest, version).unwrap(), response);
        }
    }

    #[test]
    fn advertised_versions_are_within_what_the_codec_knows() {
        use kafka_protocol::protocol::Message;
        for (key, lo, hi) in APIS {
            let range = match key {
                ApiKey::Produce => kafka_protocol::messages::ProduceRequest::VERSIONS,
                ApiKey::Fetch => kafka_protocol::messages::FetchRequest::VERSIONS,
                ApiKey::ListOffsets => kafka_protocol::messages::ListOffsetsRequest::VERSIONS,
                ApiKey::Metadata => kafka_protocol::messages::MetadataRequest::VERSIONS,
                ApiKey::ApiVersions => kafka_protocol::messages::ApiVersionsRequest::VERSIONS,
                ApiKey::CreateTopics => kafka_protocol::messages::CreateTopicsRequest::VERSIONS,
                ApiKey::DeleteTopics => kafka_protocol::messages::DeleteTopicsRequest::VERSIONS,
                ApiKey::FindCoordinator => {
                    kafka_protocol::messages::FindCoordinatorRequest::VERSIONS
                }
                ApiKey::JoinGroup => kafka_protocol::messages::JoinGroupRequest::VERSIONS,
                ApiKey::SyncGroup => kafka_protocol::messages::SyncGroupRequest::VERSIONS,
                ApiKey::Heartbeat => kafka_protocol::messages::HeartbeatRequest::VERSIONS,
                ApiKey::LeaveGroup => kafka_protocol::messages::LeaveGroupRequest::VERSIONS,
                ApiKey::OffsetCommit => kafka_protocol::messages::OffsetCommitRequest::VERSIONS,
                ApiKey::OffsetFetch => kafka_protocol::messages::OffsetFetchRequest::VERSIONS,
                ApiKey::ListGroups => kafka_protocol::messages::ListGroupsRequest::VERSIONS,
                ApiKey::DescribeGroups => kafka_protocol::messages::DescribeGroupsRequest::VERSIONS,
                ApiKey::InitProducerId => kafka_protocol::messages::InitProducerIdRequest::VERSIONS,
                ApiKey::DescribeConfigs => {
                    kafka_protocol::messages::DescribeConfigsRequest::VERSIONS
                }
                ApiKey::DeleteGroups => kafka_protocol::messages::DeleteGroupsRequest::VERSIONS,
                ApiKey::OffsetDelete => kafka_protocol::messages::OffsetDeleteRequest::VERSIONS,
                ApiKey::AlterConfigs => kafka_protocol::messages::AlterConfigsRequest::VERSIONS,
                ApiKey::DeleteRecords => kafka_protocol::messages::DeleteRecordsRequest::VERSIONS,
                ApiKey::CreatePartitions => {
                    kafka_protocol::messages::CreatePartitionsRequest::VERSIONS
                }
                ApiKey::DescribeLogDirs => {
                    kafka_protocol::messages::DescribeLogDirsRequest::VERSIONS
                }
                ApiKey::IncrementalAlterConfigs => {
                    kafka_protocol::messages::IncrementalAlterConfigsRequest::VERSIONS
                }
                ApiKey::SaslHandshake => kafka_protocol::messages::SaslHandshakeRequest::VERSIONS,
                ApiKey::SaslAuthenticate => {
                    kafka_protocol::messages::SaslAuthenticateRequest::VERSIONS
                }
                other => panic!("{other:?} has no range check"),
            };
            assert!(range.min <= *lo && *hi <= range.max, "{key:?}");
        }
        // Produce and Fetch stop before topic ids.
        assert!(!supported(ApiKey::Produce, 13));
        assert!(!supported(ApiKey::Fetch, 13));
    }
}
