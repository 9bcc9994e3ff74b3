//! The Kafka listener at the byte level: framing limits, unsupported APIs, garbage, and the error
//! codes of bad requests. Speaks to `spate_kafka::serve` over loopback TCP.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, ApiVersionsRequest, ApiVersionsResponse, MetadataRequest, MetadataResponse,
    ProduceRequest, ProduceResponse, RequestHeader, ResponseHeader, TopicName,
};
use kafka_protocol::messages::{InitProducerIdRequest, InitProducerIdResponse};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use kafka_protocol::records::{
    Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
};
use spate_broker::{Broker, Limits};
use spate_kafka::{KafkaConfig, serve};
use spate_log::mem::MemStorage;
use spate_log::{Log, LogConfig, TopicConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

async fn server() -> (String, Arc<Broker>) {
    server_with(None).await
}

/// A server whose connections must authenticate with one of `tokens`, when given.
async fn server_with(tokens: Option<&str>) -> (String, Arc<Broker>) {
    let log = Log::open(
        Arc::new(MemStorage::new()),
        Path::new("/d"),
        LogConfig::default(),
    )
    .unwrap();
    let broker = Arc::new(Broker::new(Arc::new(log), Limits::default()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let config = KafkaConfig {
        max_request_bytes: 1 << 20,
        auth: tokens.map(|t| Arc::new(spate_broker::auth::Tokens::parse(t).unwrap())),
        ..KafkaConfig::default()
    };
    let coordinator = Arc::new(
        spate_broker::groups::Coordinator::open(broker.log().clone(), Duration::ZERO, 0).unwrap(),
    );
    tokio::spawn(serve(
        listener,
        broker.clone(),
        coordinator,
        config,
        std::future::pending(),
    ));
    (addr, broker)
}

/// Creates a topic of `partitions` partitions with the default settings.
async fn topic(broker: &Broker, name: &str, partitions: u32) {
    broker
        .create_topic(
            name.into(),
            TopicConfig {
                partitions,
                ..TopicConfig::default()
            },
        )
        .await
        .unwrap();
}

fn frame<R: Encodable>(key: ApiKey, version: i16, correlation_id: i32, body: &R) -> BytesMut {
    let mut out = BytesMut::new();
    out.put_i32(0);
    RequestHeader::default()
        .with_request_api_key(key as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(StrBytes::from_static_str("test")))
        .encode(&mut out, key.request_header_version(version))
        .unwrap();
    body.encode(&mut out, version).unwrap();
    let n = (out.len() - 4) as i32;
    out[0..4].copy_from_slice(&n.to_be_bytes());
    out
}

/// Reads one response frame; `None` when the server closed the connection.
async fn read_frame(s: &mut TcpStream) -> Option<Bytes> {
    let mut len = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut len))
        .await
        .expect("no reply within 10 s")
        .ok()?;
    let mut buf = vec![0u8; i32::from_be_bytes(len) as usize];
    s.read_exact(&mut buf).await.ok()?;
    Some(Bytes::from(buf))
}

async fn call<Req: Encodable, Resp: Decodable>(
    s: &mut TcpStream,
    key: ApiKey,
    version: i16,
    body: &Req,
) -> Resp {
    s.write_all(&frame(key, version, 7, body)).await.unwrap();
    let mut b = read_frame(s).await.expect("a response");
    let h = ResponseHeader::decode(&mut b, key.response_header_version(version)).unwrap();
    assert_eq!(h.correlation_id, 7);
    Resp::decode(&mut b, version).unwrap()
}

async fn assert_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 1];
    let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf))
        .await
        .expect("closed within 10 s");
    assert!(matches!(n, Ok(0) | Err(_)), "connection should be closed");
}

/// A connection that has authenticated with SASL/PLAIN (`user`, `password`), both steps checked.
async fn authenticated(addr: &str, user: &str, password: &str) -> TcpStream {
    use kafka_protocol::messages::{
        SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest,
        SaslHandshakeResponse,
    };
    let mut s = TcpStream::connect(addr).await.unwrap();
    let h: SaslHandshakeResponse = call(
        &mut s,
        ApiKey::SaslHandshake,
        1,
        &SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str("PLAIN")),
    )
    .await;
    assert_eq!(h.error_code, 0);
    let a: SaslAuthenticateResponse = call(
        &mut s,
        ApiKey::SaslAuthenticate,
        2,
        &SaslAuthenticateRequest::default()
            .with_auth_bytes(Bytes::from(format!("{user}\0{user}\0{password}"))),
    )
    .await;
    assert_eq!(a.error_code, 0, "authenticated as {user}");
    s
}

#[tokio::test]
async fn with_tokens_connections_authenticate_with_sasl_plain_first() {
    use kafka_protocol::messages::{
        SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest,
        SaslHandshakeResponse,
    };
    let token = "kafka-token-0123456789";
    let (addr, broker) = server_with(Some(token)).await;
    topic(&broker, "t", 1).await;
    let handshake = |mechanism: &'static str| {
        SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str(mechanism))
    };
    let plain = |authzid: &str, user: &str, password: &str| {
        SaslAuthenticateRequest::default()
            .with_auth_bytes(Bytes::from(format!("{authzid}\0{user}\0{password}")))
    };
    let metadata = MetadataRequest::default().with_topics(None);
    // Anything but ApiVersions and SASL before authenticating closes the connection.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let v: ApiVersionsResponse = call(
        &mut s,
        ApiKey::ApiVersions,
        3,
        &ApiVersionsRequest::default(),
    )
    .await;
    let sasl = v
        .api_keys
        .iter()
        .find(|k| k.api_key == ApiKey::SaslHandshake as i16)
        .unwrap();
    assert_eq!((sasl.min_version, sasl.max_version), (1, 1));
    s.write_all(&frame(ApiKey::Metadata, 9, 7, &metadata))
        .await
        .unwrap();
    assert_closed(&mut s).await;
    // Only PLAIN is offered; authenticating before choosing it is out of order.
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let h: SaslHandshakeResponse = call(
        &mut s,
        ApiKey::SaslHandshake,
        1,
        &handshake("SCRAM-SHA-256"),
    )
    .await;
    assert_eq!(h.error_code, 33, "UNSUPPORTED_SASL_MECHANISM");
    assert_eq!(h.mechanisms, vec![StrBytes::from_static_str("PLAIN")]);
    let a: SaslAuthenticateResponse =
        call(&mut s, ApiKey::SaslAuthenticate, 2, &plain("", "u", token)).await;
    assert_eq!(a.error_code, 34, "ILLEGAL_SASL_STATE");
    assert_closed(&mut s).await;
    // A wrong password, malformed credentials, another authorization id: answered, then closed.
    for (authzid, user, password) in [
        ("", "u", "kafka-token-0123456789X"),
        ("", "u", ""),
        ("someone-else", "u", token),
    ] {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        let h: SaslHandshakeResponse =
            call(&mut s, ApiKey::SaslHandshake, 1, &handshake("PLAIN")).await;
        assert_eq!(h.error_code, 0);
        let a: SaslAuthenticateResponse = call(
            &mut s,
            ApiKey::SaslAuthenticate,
            2,
            &plain(authzid, user, password),
        )
        .await;
        assert_eq!(a.error_code, 58, "SASL_AUTHENTICATION_FAILED");
        assert!(a.error_message.is_some());
        assert_closed(&mut s).await;
    }
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let a: SaslAuthenticateResponse = call(
        &mut s,
        ApiKey::SaslAuthenticate,
        2,
        &SaslAuthenticateRequest::default().with_auth_bytes(Bytes::from_static(b"no-nul-bytes")),
    )
    .await;
    assert_eq!(a.error_code, 34);
    // The token as the password: requests are served from then on.
    let mut s = authenticated(&addr, "app", token).await;
    let m: MetadataResponse = call(&mut s, ApiKey::Metadata, 9, &metadata).await;
    assert!(
        m.topics
            .iter()
            .any(|t| t.name.as_ref().is_some_and(|n| n.as_str() == "t"))
    );
    let h: SaslHandshakeResponse =
        call(&mut s, ApiKey::SaslHandshake, 1, &handshake("PLAIN")).await;
    assert_eq!(h.error_code, 34, "a second handshake is out of order");

    // Without tokens, SASL is refused and nothing needs it.
    let (addr, _) = server().await;
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let h: SaslHandshakeResponse =
        call(&mut s, ApiKey::SaslHandshake, 1, &handshake("PLAIN")).await;
    assert_eq!(h.error_code, 34);
    let m: MetadataResponse = call(&mut s, ApiKey::Metadata, 9, &metadata).await;
    assert!(m.brokers.len() == 1, "served without authentication");
}

#[tokio::test]
async fn api_versions_lists_what_is_implemented_and_answers_newer_versions_at_v0() {
    let (addr, _) = server().await;
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let r: ApiVersionsResponse = call(
        &mut s,
        ApiKey::ApiVersions,
        3,
        &ApiVersionsRequest::default(),
    )
    .await;
    assert_eq!(r.error_code, 0);
    let produce = r
        .api_keys
        .iter()
        .find(|k| k.api_key == ApiKey::Produce as i16)
        .unwrap();
    assert_eq!((produce.min_version, produce.max_version), (3, 12));
    // A version newer than ours: the reply is v0 with UNSUPPORTED_VERSION and our list.
    let mut req = frame(ApiKey::ApiVersions, 3, 9, &ApiVersionsRequest::default());
    req[6..8].copy_from_slice(&99i16.to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut b = read_frame(&mut s).await.unwrap();
    assert_eq!(b.get_i32(), 9);
    let r = ApiVersionsResponse::decode(&mut b, 0).unwrap();
    assert_eq!(r.error_code, 35);
    assert!(r.api_keys.iter().any(|k| k.api_key == ApiKey::Fetch as i16));
}

#[tokio::test]
async fn unknown_api_keys_and_versions_get_unsupported_version() {
    let (addr, _) = server().await;
    let mut s = TcpStream::connect(&addr).await.unwrap();
    for (key, version) in [
        (9999i16, 0i16),
        (ApiKey::Produce as i16, 2),
        (ApiKey::Fetch as i16, 13),
    ] {
        let mut req = BytesMut::new();
        req.put_i32(10);
        req.put_i16(key);
        req.put_i16(version);
        req.put_i32(42);
        req.put_i16(-1);
        s.write_all(&req).await.unwrap();
        let mut b = read_frame(&mut s)
            .await
            .expect("an error response, not a closed connection");
        assert_eq!(b.get_i32(), 42);
        assert_eq!(b.get_i16(), 35, "key {key} v{version}");
    }
    // The connection still works.
    let r: ApiVersionsResponse = call(
        &mut s,
        ApiKey::ApiVersions,
        0,
        &ApiVersionsRequest::default(),
    )
    .await;
    assert_eq!(r.error_code, 0);
}

#[tokio::test]
async fn an_oversized_frame_closes_the_connection() {
    let (addr, _) = server().await;
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&(64i32 << 20).to_be_bytes()).await.unwrap();
    assert_closed(&mut s).await;
    let mut s = TcpStream::connect(&addr).await.unwrap();
    s.write_all(&(-1i32).to_be_bytes()).await.unwrap();
    assert_closed(&mut s).await;
}

#[tokio::test]
async fn garbage_and_truncated_bodies_close_the_connection_and_the_server_lives_on() {
    let (addr, _) = server().await;
    let valid = frame(
        ApiKey::Metadata,
        12,
        1,
        &MetadataRequest::default().with_topics(Some(vec![
            MetadataRequestTopic::default()
                .with_name(Some(TopicName(StrBytes::from_static_str("t")))),
        ])),
    );
    let mut cases: Vec<Vec<u8>> = Vec::new();
    // Truncated body with a consistent frame size.
    let mut t = valid[4..valid.len() - 3].to_vec();
    let mut framed = (t.len() as i32).to_be_bytes().to_vec();
    framed.append(&mut t);
    cases.push(framed);
    // Random garbage after a valid header prefix.
    let mut g = valid[4..14].to_vec();
    g.extend((0..200u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    let mut framed = (g.len() as i32).to_be_bytes().to_vec();
    framed.extend(g);
    cases.push(framed);
    // Too short for a header.
    cases.push(vec![0, 0, 0, 3, 0, 3, 0]);
    for case in cases {
        let mut s = TcpStream::connect(&addr).await.unwrap();
        s.write_all(&case).await.unwrap();
        // Either an error response or a closed connection; never a hang or a crash.
        if let Some(b) = read_frame(&mut s).await {
            assert!(b.len() >= 4);
        }
        assert_closed(&mut s).await;
    }
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let r: ApiVersionsResponse = call(
        &mut s,
        ApiKey::ApiVersions,
        3,
        &ApiVersionsRequest::default(),
    )
    .await;
    assert_eq!(r.error_code, 0);
}

/// A produce request (acks -1) of `records` to one partition.
fn produce(topic: &'static str, partition: i32, records: Vec<u8>) -> ProduceRequest {
    ProduceRequest::default()
        .with_acks(-1)
        .with_timeout_ms(1000)
        .with_topic_data(vec![
            TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_static_str(topic)))
                .with_partition_data(vec![
                    PartitionProduceData::default()
                        .with_index(partition)
                        .with_records(Some(Bytes::from(records))),
                ]),
        ])
}

#[tokio::test]
async fn produce_to_an_unknown_topic_or_with_a_bad_batch_gets_the_right_code() {
    let (addr, broker) = server().await;
    broker
        .create_topic("t".into(), TopicConfig::default())
        .await
        .unwrap();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let mut good = spate_log::batch::encode(&[spate_log::batch::NewRecord {
        timestamp_ms: 1,
        value: Some(b"v".to_vec()),
        ..Default::default()
    }])
    .unwrap();
    let mut bad = good.clone();
    let n = bad.len();
    bad[n - 1] ^= 1;
    spate_log::batch::set_base_offset(&mut good, 0);
    let cases = [
        (produce("nope", 0, good.clone()), 3),
        (produce("__consumer_offsets", 0, good.clone()), 17),
        (produce("t", 5, good.clone()), 3),
        (produce("t", 0, bad), 2),
        (produce("t", 0, good.clone()), 0),
    ];
    for (req, code) in cases {
        let r: ProduceResponse = call(&mut s, ApiKey::Produce, 9, &req).await;
        let p = &r.responses[0].partition_responses[0];
        assert_eq!(p.error_code, code);
        if code == 0 {
            assert_eq!(p.base_offset, 0);
        }
    }
    // acks other than -1, 0 and 1: INVALID_REQUIRED_ACKS for every partition, nothing written,
    // and the connection goes on.
    for acks in [2, -2, i16::MAX] {
        let r: ProduceResponse = call(
            &mut s,
            ApiKey::Produce,
            9,
            &produce("t", 0, good.clone()).with_acks(acks),
        )
        .await;
        let p = &r.responses[0].partition_responses[0];
        assert_eq!(
            (p.index, p.error_code, p.base_offset),
            (0, 21, -1),
            "acks {acks}"
        );
    }
    assert_eq!(broker.topic("t").unwrap().partitions[0].log_end_offset(), 1);
    // Metadata for an unknown topic, with auto-creation off.
    let r: MetadataResponse = call(
        &mut s,
        ApiKey::Metadata,
        12,
        &MetadataRequest::default()
            .with_allow_auto_topic_creation(true)
            .with_topics(Some(vec![
                MetadataRequestTopic::default()
                    .with_name(Some(TopicName(StrBytes::from_static_str("nope")))),
            ])),
    )
    .await;
    assert_eq!(r.topics[0].error_code, 3);
    assert!(broker.topic("nope").is_err());
}

#[tokio::test]
async fn idempotent_produce_retries_are_answered_with_the_original_offsets() {
    let (addr, broker) = server().await;
    broker
        .create_topic("t".into(), TopicConfig::default())
        .await
        .unwrap();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let init: InitProducerIdResponse = call(
        &mut s,
        ApiKey::InitProducerId,
        4,
        &InitProducerIdRequest::default()
            .with_transactional_id(None)
            .with_producer_id(kafka_protocol::messages::ProducerId(-1))
            .with_producer_epoch(-1),
    )
    .await;
    assert_eq!(init.error_code, 0);
    let pid = init.producer_id.0;
    assert!(pid >= 0);
    let batch = |seq: i32, n: usize| {
        let records: Vec<spate_log::batch::NewRecord> = (0..n)
            .map(|i| spate_log::batch::NewRecord {
                timestamp_ms: 1,
                value: Some(vec![i as u8]),
                ..Default::default()
            })
            .collect();
        spate_log::batch::encode_idempotent(&records, pid, init.producer_epoch, seq).unwrap()
    };
    let produce = |records: Vec<u8>| produce("t", 0, records);
    let mut send = async |records: Vec<u8>| -> (i16, i64) {
        let r: ProduceResponse = call(&mut s, ApiKey::Produce, 9, &produce(records)).await;
        let p = &r.responses[0].partition_responses[0];
        (p.error_code, p.base_offset)
    };
    assert_eq!(send(batch(0, 3)).await, (0, 0));
    assert_eq!(send(batch(3, 2)).await, (0, 3));
    // The retry of a batch whose answer was lost gets its original offset; nothing is written.
    assert_eq!(send(batch(0, 3)).await, (0, 0));
    assert_eq!(send(batch(3, 2)).await, (0, 3));
    // A gap in the sequence is OUT_OF_ORDER_SEQUENCE_NUMBER.
    assert_eq!(send(batch(9, 1)).await.0, 45);
    assert_eq!(
        broker
            .topic("t")
            .unwrap()
            .partition(0)
            .unwrap()
            .high_watermark(),
        5
    );
    // Transactions are not offered.
    let txn: InitProducerIdResponse = call(
        &mut s,
        ApiKey::InitProducerId,
        4,
        &InitProducerIdRequest::default()
            .with_transactional_id(Some(StrBytes::from_static_str("tx").into())),
    )
    .await;
    assert_ne!(txn.error_code, 0);
}

#[tokio::test]
async fn group_requests_are_fenced_by_generation_and_member() {
    use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
    use kafka_protocol::messages::sync_group_request::SyncGroupRequestAssignment;
    use kafka_protocol::messages::{
        GroupId, HeartbeatRequest, HeartbeatResponse, JoinGroupRequest, JoinGroupResponse,
        SyncGroupRequest, SyncGroupResponse,
    };
    let (addr, _) = server().await;
    let mut a = TcpStream::connect(&addr).await.unwrap();
    let group = || GroupId(StrBytes::from_static_str("g"));
    fn join(member: StrBytes) -> JoinGroupRequest {
        JoinGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("g")))
            .with_session_timeout_ms(10_000)
            .with_rebalance_timeout_ms(5_000)
            .with_member_id(member)
            .with_protocol_type(StrBytes::from_static_str("consumer"))
            .with_protocols(vec![
                JoinGroupRequestProtocol::default()
                    .with_name(StrBytes::from_static_str("range"))
                    .with_metadata(Bytes::from_static(b"m")),
            ])
    }
    let j: JoinGroupResponse = call(&mut a, ApiKey::JoinGroup, 7, &join(StrBytes::default())).await;
    assert_eq!((j.error_code, j.generation_id), (0, 1));
    assert_eq!(j.leader, j.member_id);
    let me = j.member_id.clone();
    let sync = |generation: i32, member: StrBytes| {
        SyncGroupRequest::default()
            .with_group_id(group())
            .with_generation_id(generation)
            .with_member_id(member.clone())
            .with_assignments(vec![
                SyncGroupRequestAssignment::default()
                    .with_member_id(member)
                    .with_assignment(Bytes::from_static(b"all")),
            ])
    };
    let s: SyncGroupResponse = call(&mut a, ApiKey::SyncGroup, 5, &sync(1, me.clone())).await;
    assert_eq!((s.error_code, s.assignment.as_ref()), (0, &b"all"[..]));
    let heartbeat = |generation: i32, member: StrBytes| {
        HeartbeatRequest::default()
            .with_group_id(group())
            .with_generation_id(generation)
            .with_member_id(member)
    };
    let h: HeartbeatResponse = call(&mut a, ApiKey::Heartbeat, 4, &heartbeat(1, me.clone())).await;
    assert_eq!(h.error_code, 0);
    // A stale generation and an unknown member are fenced.
    let h: HeartbeatResponse = call(&mut a, ApiKey::Heartbeat, 4, &heartbeat(0, me.clone())).await;
    assert_eq!(h.error_code, 22, "ILLEGAL_GENERATION");
    let h: HeartbeatResponse = call(
        &mut a,
        ApiKey::Heartbeat,
        4,
        &heartbeat(1, StrBytes::from_static_str("stranger")),
    )
    .await;
    assert_eq!(h.error_code, 25, "UNKNOWN_MEMBER_ID");
    let s: SyncGroupResponse = call(&mut a, ApiKey::SyncGroup, 5, &sync(7, me.clone())).await;
    assert_eq!(s.error_code, 22);
    // A second member joins on its own connection: the first learns of the rebalance.
    let addr2 = addr.clone();
    let second = tokio::spawn(async move {
        let mut b = TcpStream::connect(&addr2).await.unwrap();
        let j: JoinGroupResponse =
            call(&mut b, ApiKey::JoinGroup, 7, &join(StrBytes::default())).await;
        j
    });
    let mut rebalancing = false;
    for _ in 0..100 {
        let h: HeartbeatResponse =
            call(&mut a, ApiKey::Heartbeat, 4, &heartbeat(1, me.clone())).await;
        if h.error_code == 27 {
            rebalancing = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        rebalancing,
        "REBALANCE_IN_PROGRESS reaches the first member"
    );
    let j: JoinGroupResponse = call(&mut a, ApiKey::JoinGroup, 7, &join(me.clone())).await;
    let other = second.await.unwrap();
    assert_eq!((j.generation_id, other.generation_id), (2, 2));
    assert_eq!(j.members.len(), 2, "the leader sees both members");
    // The old generation is fenced from now on.
    let h: HeartbeatResponse = call(&mut a, ApiKey::Heartbeat, 4, &heartbeat(1, me)).await;
    assert_eq!(h.error_code, 22);
}

#[tokio::test]
async fn a_static_member_rejoining_replaces_its_predecessor_which_is_fenced() {
    use kafka_protocol::messages::join_group_request::JoinGroupRequestProtocol;
    use kafka_protocol::messages::leave_group_request::MemberIdentity;
    use kafka_protocol::messages::{
        DescribeGroupsRequest, DescribeGroupsResponse, GroupId, HeartbeatRequest,
        HeartbeatResponse, JoinGroupRequest, JoinGroupResponse, LeaveGroupRequest,
        LeaveGroupResponse, SyncGroupRequest, SyncGroupResponse,
    };
    let (addr, _) = server().await;
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let group = || GroupId(StrBytes::from_static_str("g"));
    let instance = || Some(StrBytes::from_static_str("host-1"));
    let join = |member: StrBytes| {
        JoinGroupRequest::default()
            .with_group_id(group())
            .with_session_timeout_ms(10_000)
            .with_rebalance_timeout_ms(5_000)
            .with_member_id(member)
            .with_group_instance_id(instance())
            .with_protocol_type(StrBytes::from_static_str("consumer"))
            .with_protocols(vec![
                JoinGroupRequestProtocol::default()
                    .with_name(StrBytes::from_static_str("range"))
                    .with_metadata(Bytes::from_static(b"m")),
            ])
    };
    let first: JoinGroupResponse =
        call(&mut s, ApiKey::JoinGroup, 7, &join(StrBytes::default())).await;
    assert_eq!((first.error_code, first.generation_id), (0, 1));
    let sync = SyncGroupRequest::default()
        .with_group_id(group())
        .with_generation_id(1)
        .with_member_id(first.member_id.clone())
        .with_group_instance_id(instance());
    let synced: SyncGroupResponse = call(&mut s, ApiKey::SyncGroup, 5, &sync).await;
    assert_eq!(synced.error_code, 0);
    // The same instance joins again without a member id (a restart): answered at once in the
    // same generation; a v7 client is given the old leader id, so it does not assign.
    let second: JoinGroupResponse =
        call(&mut s, ApiKey::JoinGroup, 7, &join(StrBytes::default())).await;
    assert_eq!((second.error_code, second.generation_id), (0, 1));
    assert_ne!(second.member_id, first.member_id);
    assert_eq!(second.leader, first.member_id);
    let heartbeat = |member: StrBytes| {
        HeartbeatRequest::default()
            .with_group_id(group())
            .with_generation_id(1)
            .with_member_id(member)
            .with_group_instance_id(instance())
    };
    let h: HeartbeatResponse = call(
        &mut s,
        ApiKey::Heartbeat,
        4,
        &heartbeat(first.member_id.clone()),
    )
    .await;
    assert_eq!(h.error_code, 82, "FENCED_INSTANCE_ID");
    let h: HeartbeatResponse = call(
        &mut s,
        ApiKey::Heartbeat,
        4,
        &heartbeat(second.member_id.clone()),
    )
    .await;
    assert_eq!(h.error_code, 0);
    // A v9 client learns that it leads and must skip the assignment.
    let third: JoinGroupResponse =
        call(&mut s, ApiKey::JoinGroup, 9, &join(StrBytes::default())).await;
    assert_eq!((third.error_code, third.generation_id), (0, 1));
    assert_eq!(third.leader, third.member_id);
    assert!(third.skip_assignment);
    let described: DescribeGroupsResponse = call(
        &mut s,
        ApiKey::DescribeGroups,
        5,
        &DescribeGroupsRequest::default().with_groups(vec![group()]),
    )
    .await;
    let g = &described.groups[0];
    assert_eq!(g.group_state.as_str(), "Stable");
    assert_eq!(g.members.len(), 1);
    assert_eq!(g.members[0].group_instance_id, instance());
    assert_eq!(g.members[0].member_id, third.member_id);
    // Versions before 4 have no instance id: the same group is described without it.
    let old: DescribeGroupsResponse = call(
        &mut s,
        ApiKey::DescribeGroups,
        3,
        &DescribeGroupsRequest::default().with_groups(vec![group()]),
    )
    .await;
    assert_eq!(old.groups[0].members[0].member_id, third.member_id);
    assert_eq!(old.groups[0].members[0].group_instance_id, None);
    // Leaving by instance id alone; a wrong member id for the instance is fenced.
    let leave = |member: &str| {
        LeaveGroupRequest::default()
            .with_group_id(group())
            .with_members(vec![
                MemberIdentity::default()
                    .with_member_id(StrBytes::from_string(member.to_string()))
                    .with_group_instance_id(instance()),
            ])
    };
    let left: LeaveGroupResponse = call(
        &mut s,
        ApiKey::LeaveGroup,
        4,
        &leave(first.member_id.as_str()),
    )
    .await;
    assert_eq!(left.members[0].error_code, 82);
    let left: LeaveGroupResponse = call(&mut s, ApiKey::LeaveGroup, 4, &leave("")).await;
    assert_eq!((left.error_code, left.members[0].error_code), (0, 0));
    let described: DescribeGroupsResponse = call(
        &mut s,
        ApiKey::DescribeGroups,
        5,
        &DescribeGroupsRequest::default().with_groups(vec![group()]),
    )
    .await;
    assert!(described.groups[0].members.is_empty());
}

#[tokio::test]
async fn committed_metadata_and_commits_over_their_limits_are_refused() {
    use kafka_protocol::messages::offset_commit_request::{
        OffsetCommitRequestPartition, OffsetCommitRequestTopic,
    };
    use kafka_protocol::messages::offset_fetch_request::OffsetFetchRequestTopic;
    use kafka_protocol::messages::{
        GroupId, OffsetCommitRequest, OffsetCommitResponse, OffsetFetchRequest, OffsetFetchResponse,
    };
    let (addr, broker) = server().await;
    topic(&broker, "t", 2).await;
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let max = spate_broker::groups::OFFSET_METADATA_MAX;
    let part = |p: i32, offset: i64, metadata: usize| {
        OffsetCommitRequestPartition::default()
            .with_partition_index(p)
            .with_committed_offset(offset)
            .with_committed_metadata(Some(StrBytes::from_string("m".repeat(metadata))))
    };
    // Commits outside group management (generation -1), as kcat and admin tools make.
    let commit = |topic: &'static str, partitions| {
        OffsetCommitRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("g")))
            .with_generation_id_or_member_epoch(-1)
            .with_topics(vec![
                OffsetCommitRequestTopic::default()
                    .with_name(TopicName(StrBytes::from_static_str(topic)))
                    .with_partitions(partitions),
            ])
    };
    let codes = |r: OffsetCommitResponse| -> Vec<i16> {
        r.topics[0]
            .partitions
            .iter()
            .map(|p| p.error_code)
            .collect()
    };
    let fetch = |topic: &'static str, partitions| {
        OffsetFetchRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("g")))
            .with_topics(Some(vec![
                OffsetFetchRequestTopic::default()
                    .with_name(TopicName(StrBytes::from_static_str(topic)))
                    .with_partition_indexes(partitions),
            ]))
    };
    let request = commit("t", vec![part(0, 5, max), part(1, 7, max + 1)]);
    let codes_t = codes(call(&mut s, ApiKey::OffsetCommit, 8, &request).await);
    assert_eq!(
        codes_t,
        [0, 12],
        "OFFSET_METADATA_TOO_LARGE for the second only"
    );
    let r: OffsetFetchResponse =
        call(&mut s, ApiKey::OffsetFetch, 7, &fetch("t", vec![0, 1])).await;
    let got: Vec<(i64, usize)> = r.topics[0]
        .partitions
        .iter()
        .map(|p| {
            (
                p.committed_offset,
                p.metadata.as_ref().map_or(0, |m| m.len()),
            )
        })
        .collect();
    assert_eq!(got, [(5, max), (-1, 0)]);

    // One commit is stored whole: more than the offsets topic takes in one batch (about 1 MiB)
    // gets INVALID_COMMIT_OFFSET_SIZE for every partition, and nothing is stored.
    topic(&broker, "wide", 250).await;
    let wide = commit("wide", (0..250).map(|p| part(p, 1, max)).collect());
    let codes_wide = codes(call(&mut s, ApiKey::OffsetCommit, 8, &wide).await);
    assert!(codes_wide.iter().all(|c| *c == 28), "{codes_wide:?}");
    let r: OffsetFetchResponse =
        call(&mut s, ApiKey::OffsetFetch, 7, &fetch("wide", vec![0, 249])).await;
    assert!(
        r.topics[0]
            .partitions
            .iter()
            .all(|p| p.committed_offset == -1)
    );
}

/// One v2 batch of `values`, compressed with `compression`, as a Kafka producer sends it.
fn compressed_batch(values: &[Vec<u8>], compression: Compression) -> Vec<u8> {
    let records: Vec<Record> = values
        .iter()
        .enumerate()
        .map(|(i, v)| Record {
            transactional: false,
            control: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            // The encoder keeps records in one batch while offset minus sequence stays the same.
            sequence: i as i32 - 1,
            timestamp: 1_700_000_000_000,
            key: None,
            value: Some(Bytes::from(v.clone())),
            headers: Default::default(),
            delete_horizon: false,
        })
        .collect();
    let mut out = BytesMut::new();
    RecordBatchEncoder::encode(
        &mut out,
        &records,
        &RecordEncodeOptions {
            version: 2,
            compression,
        },
    )
    .unwrap();
    out.to_vec()
}

#[tokio::test]
async fn compressed_batches_that_expand_too_far_or_do_not_decompress_are_refused() {
    let (addr, broker) = server().await;
    let config = TopicConfig {
        max_message_bytes: 1 << 20,
        ..TopicConfig::default()
    };
    broker.create_topic("z".into(), config).await.unwrap();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let produce = |records: Vec<u8>| produce("z", 0, records);
    // Zeros past the bound shrink to a few hundred KiB or less.
    let bomb = vec![vec![
        0u8;
        spate_broker::compressed::MAX_DECOMPRESSED_BYTES + 1
    ]];
    let mut corrupt = compressed_batch(&[b"a value".repeat(50)], Compression::Zstd);
    let n = corrupt.len();
    for b in &mut corrupt[70..n] {
        *b ^= 0x5a;
    }
    spate_log::batch::seal(&mut corrupt);
    let cases = [
        (compressed_batch(&bomb, Compression::Zstd), 10),
        (compressed_batch(&bomb, Compression::Gzip), 10),
        (compressed_batch(&bomb, Compression::Lz4), 10),
        (corrupt, 2),
        (
            compressed_batch(&[b"kept".to_vec(), b"too".to_vec()], Compression::Lz4),
            0,
        ),
    ];
    for (records, code) in cases {
        assert!(records.len() < 1 << 20, "{} bytes", records.len());
        let r: ProduceResponse = call(&mut s, ApiKey::Produce, 9, &produce(records)).await;
        assert_eq!(r.responses[0].partition_responses[0].error_code, code);
    }
    // Only the good batch was stored, and it reads back.
    let p = broker.topic("z").unwrap().partitions[0].clone();
    assert_eq!(p.high_watermark(), 2);
    let page = spate_broker::read_events(&p, "z", 0, 0, 10).unwrap();
    assert_eq!(page.events.len(), 2);
}

/// A topic's settings as DescribeConfigs reports them: name → (value, source).
async fn described(s: &mut TcpStream, topic: &str) -> (i16, Vec<(String, String, i8)>) {
    use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
    use kafka_protocol::messages::{DescribeConfigsRequest, DescribeConfigsResponse};
    let r: DescribeConfigsResponse = call(
        s,
        ApiKey::DescribeConfigs,
        4,
        &DescribeConfigsRequest::default().with_resources(vec![
            DescribeConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(StrBytes::from_string(topic.to_string())),
        ]),
    )
    .await;
    let res = &r.results[0];
    let configs = res
        .configs
        .iter()
        .map(|c| {
            (
                c.name.to_string(),
                c.value.as_ref().map(|v| v.to_string()).unwrap_or_default(),
                c.config_source,
            )
        })
        .collect();
    (res.error_code, configs)
}

fn value_of(configs: &[(String, String, i8)], name: &str) -> (String, i8) {
    let (_, v, source) = configs.iter().find(|(n, ..)| n == name).unwrap();
    (v.clone(), *source)
}

/// A setting's name, IncrementalAlterConfigs operation and value.
type Change<'a> = (&'a str, i8, Option<&'a str>);

/// One IncrementalAlterConfigs resource.
fn incremental(
    resource_type: i8,
    name: &str,
    configs: &[Change],
) -> kafka_protocol::messages::incremental_alter_configs_request::AlterConfigsResource {
    use kafka_protocol::messages::incremental_alter_configs_request::{
        AlterConfigsResource, AlterableConfig,
    };
    AlterConfigsResource::default()
        .with_resource_type(resource_type)
        .with_resource_name(StrBytes::from_string(name.to_string()))
        .with_configs(
            configs
                .iter()
                .map(|(n, op, v)| {
                    AlterableConfig::default()
                        .with_name(StrBytes::from_string(n.to_string()))
                        .with_config_operation(*op)
                        .with_value(v.map(|v| StrBytes::from_string(v.to_string())))
                })
                .collect(),
        )
}

#[tokio::test]
async fn topic_settings_change_with_alter_configs_and_bad_changes_get_the_right_code() {
    use kafka_protocol::messages::alter_configs_request::{AlterConfigsResource, AlterableConfig};
    use kafka_protocol::messages::{
        AlterConfigsRequest, AlterConfigsResponse, IncrementalAlterConfigsRequest,
        IncrementalAlterConfigsResponse,
    };
    const SET: i8 = 0;
    const DELETE: i8 = 1;
    const APPEND: i8 = 2;
    const SUBTRACT: i8 = 3;
    const INVALID_CONFIG: i16 = 40;
    const INVALID_REQUEST: i16 = 42;
    let (addr, broker) = server().await;
    topic(&broker, "t", 3).await;
    let default = TopicConfig::default();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let (code, configs) = described(&mut s, "t").await;
    assert_eq!(code, 0);
    assert_eq!(
        value_of(&configs, "retention.ms"),
        (default.retention_ms.unwrap().to_string(), 5)
    );

    // SET changes what is named and nothing else; the change is seen by readers of the topic.
    for version in [0, 1] {
        let r: IncrementalAlterConfigsResponse = call(
            &mut s,
            ApiKey::IncrementalAlterConfigs,
            version,
            &IncrementalAlterConfigsRequest::default().with_resources(vec![incremental(
                2,
                "t",
                &[
                    ("retention.ms", SET, Some("3600000")),
                    ("segment.bytes", SET, Some("2097152")),
                ],
            )]),
        )
        .await;
        assert_eq!(r.responses[0].error_code, 0, "{:?}", r.responses[0]);
    }
    let c = broker.topic("t").unwrap().config();
    assert_eq!(
        (c.retention_ms, c.segment_bytes, c.partitions),
        (Some(3_600_000), 2 << 20, 3)
    );
    assert_eq!(c.max_message_bytes, default.max_message_bytes);
    let (_, configs) = described(&mut s, "t").await;
    assert_eq!(value_of(&configs, "retention.ms"), ("3600000".into(), 1));
    assert_eq!(value_of(&configs, "segment.bytes"), ("2097152".into(), 1));
    assert_eq!(
        value_of(&configs, "max.message.bytes"),
        (default.max_message_bytes.to_string(), 5)
    );

    // Bad changes get the right code, and change nothing of the resource they are in.
    let refused: &[(&[Change], i16)] = &[
        (
            &[
                ("retention.ms", SET, Some("60000")),
                ("segment.bytes", SET, Some("ten")),
            ],
            INVALID_CONFIG,
        ),
        (&[("retention.ms", SET, Some("-7"))], INVALID_CONFIG),
        (&[("segment.bytes", SET, Some("100"))], INVALID_CONFIG),
        (
            &[("max.message.bytes", SET, Some("3000000"))],
            INVALID_CONFIG,
        ),
        (&[("cleanup.policy", SET, Some("compact"))], INVALID_CONFIG),
        (&[("compression.type", SET, Some("zstd"))], INVALID_CONFIG),
        (&[("retention.ms", APPEND, Some("1"))], INVALID_CONFIG),
        (
            &[("cleanup.policy", SUBTRACT, Some("delete"))],
            INVALID_CONFIG,
        ),
        (&[("retention.ms", 9, Some("1"))], INVALID_REQUEST),
        (
            &[
                ("retention.ms", SET, Some("1000")),
                ("retention.ms", SET, Some("2000")),
            ],
            INVALID_REQUEST,
        ),
    ];
    for (configs, want) in refused {
        let r: IncrementalAlterConfigsResponse = call(
            &mut s,
            ApiKey::IncrementalAlterConfigs,
            1,
            &IncrementalAlterConfigsRequest::default()
                .with_resources(vec![incremental(2, "t", configs)]),
        )
        .await;
        let res = &r.responses[0];
        assert_eq!(res.error_code, *want, "{configs:?}");
        assert!(res.error_message.is_some(), "{configs:?}");
        assert_eq!(broker.topic("t").unwrap().config(), c, "{configs:?}");
    }
    // Other resources of the same request: unknown and internal topics, the broker, an unknown
    // resource type; validate_only checks without changing.
    let r: IncrementalAlterConfigsResponse = call(
        &mut s,
        ApiKey::IncrementalAlterConfigs,
        1,
        &IncrementalAlterConfigsRequest::default().with_resources(vec![
            incremental(2, "missing", &[("retention.ms", SET, Some("1000"))]),
            incremental(
                2,
                "__consumer_offsets",
                &[("retention.ms", SET, Some("1000"))],
            ),
            incremental(4, "0", &[("log.retention.ms", SET, Some("1000"))]),
            incremental(99, "x", &[]),
        ]),
    )
    .await;
    let codes: Vec<i16> = r.responses.iter().map(|r| r.error_code).collect();
    assert_eq!(codes, [3, 17, INVALID_REQUEST, INVALID_REQUEST]);
    let r: IncrementalAlterConfigsResponse = call(
        &mut s,
        ApiKey::IncrementalAlterConfigs,
        1,
        &IncrementalAlterConfigsRequest::default()
            .with_validate_only(true)
            .with_resources(vec![incremental(
                2,
                "t",
                &[("retention.ms", SET, Some("1000"))],
            )]),
    )
    .await;
    assert_eq!(r.responses[0].error_code, 0);
    assert_eq!(broker.topic("t").unwrap().config(), c);

    // DELETE puts a setting back to its default.
    let r: IncrementalAlterConfigsResponse = call(
        &mut s,
        ApiKey::IncrementalAlterConfigs,
        1,
        &IncrementalAlterConfigsRequest::default().with_resources(vec![incremental(
            2,
            "t",
            &[("segment.bytes", DELETE, None)],
        )]),
    )
    .await;
    assert_eq!(r.responses[0].error_code, 0);
    let c = broker.topic("t").unwrap().config();
    assert_eq!(
        (c.retention_ms, c.segment_bytes),
        (Some(3_600_000), default.segment_bytes)
    );

    // The older AlterConfigs replaces the whole set: settings not named go back to defaults.
    let r: AlterConfigsResponse = call(
        &mut s,
        ApiKey::AlterConfigs,
        1,
        &AlterConfigsRequest::default().with_resources(vec![
            AlterConfigsResource::default()
                .with_resource_type(2)
                .with_resource_name(StrBytes::from_static_str("t"))
                .with_configs(vec![
                    AlterableConfig::default()
                        .with_name(StrBytes::from_static_str("retention.bytes"))
                        .with_value(Some(StrBytes::from_static_str("1073741824"))),
                ]),
        ]),
    )
    .await;
    assert_eq!(r.responses[0].error_code, 0, "{:?}", r.responses[0]);
    let c = broker.topic("t").unwrap().config();
    assert_eq!(
        c,
        TopicConfig {
            partitions: 3,
            retention_bytes: Some(1 << 30),
            ..default
        }
    );
}

#[tokio::test]
async fn delete_records_moves_the_log_start_and_bad_requests_get_the_right_code() {
    use kafka_protocol::messages::delete_records_request::{
        DeleteRecordsPartition, DeleteRecordsTopic,
    };
    use kafka_protocol::messages::list_offsets_request::{ListOffsetsPartition, ListOffsetsTopic};
    use kafka_protocol::messages::{
        BrokerId, DeleteRecordsRequest, DeleteRecordsResponse, ListOffsetsRequest,
        ListOffsetsResponse,
    };
    let (addr, broker) = server().await;
    topic(&broker, "t", 2).await;
    let events: Vec<spate_broker::Event> = (0..20)
        .map(|i| {
            spate_broker::Event::from_json(serde_json::json!({
                "type": "t", "partitionkey": format!("k{i}"), "data": i
            }))
            .unwrap()
        })
        .collect();
    broker.publish("t", events).await.unwrap();
    let t = broker.topic("t").unwrap();
    let ends: Vec<u64> = t.partitions.iter().map(|p| p.high_watermark()).collect();
    assert!(ends.iter().all(|e| *e >= 3), "{ends:?}");
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let delete = |topic: &'static str, parts: &[(i32, i64)]| {
        DeleteRecordsRequest::default()
            .with_timeout_ms(1000)
            .with_topics(vec![
                DeleteRecordsTopic::default()
                    .with_name(TopicName(StrBytes::from_static_str(topic)))
                    .with_partitions(
                        parts
                            .iter()
                            .map(|(p, o)| {
                                DeleteRecordsPartition::default()
                                    .with_partition_index(*p)
                                    .with_offset(*o)
                            })
                            .collect(),
                    ),
            ])
    };
    let results = |r: DeleteRecordsResponse| -> Vec<(i16, i64)> {
        r.topics[0]
            .partitions
            .iter()
            .map(|p| (p.error_code, p.low_watermark))
            .collect()
    };
    // Partition 0 to offset 2, partition 1 to its end (-1).
    for version in [0, 2] {
        let r: DeleteRecordsResponse = call(
            &mut s,
            ApiKey::DeleteRecords,
            version,
            &delete("t", &[(0, 2), (1, -1)]),
        )
        .await;
        assert_eq!(results(r), [(0, 2), (0, ends[1] as i64)]);
    }
    assert_eq!(t.partitions[0].log_start_offset(), 2);
    assert_eq!(t.partitions[1].log_start_offset(), ends[1]);
    // Consumers asking for the earliest offset get the new start.
    let r: ListOffsetsResponse = call(
        &mut s,
        ApiKey::ListOffsets,
        6,
        &ListOffsetsRequest::default()
            .with_replica_id(BrokerId(-1))
            .with_topics(vec![
                ListOffsetsTopic::default()
                    .with_name(TopicName(StrBytes::from_static_str("t")))
                    .with_partitions(vec![
                        ListOffsetsPartition::default()
                            .with_partition_index(0)
                            .with_timestamp(-2),
                    ]),
            ]),
    )
    .await;
    assert_eq!(r.topics[0].partitions[0].offset, 2);
    // Before the start: nothing changes; past the end, a bad offset or partition: refused.
    let r: DeleteRecordsResponse = call(
        &mut s,
        ApiKey::DeleteRecords,
        2,
        &delete(
            "t",
            &[(0, 1), (0, ends[0] as i64 + 1), (0, -5), (7, 1), (-1, 1)],
        ),
    )
    .await;
    assert_eq!(results(r), [(0, 2), (1, -1), (1, -1), (3, -1), (3, -1)]);
    assert_eq!(t.partitions[0].log_start_offset(), 2);
    for (topic, code) in [("nope", 3), ("__consumer_offsets", 17)] {
        let r: DeleteRecordsResponse =
            call(&mut s, ApiKey::DeleteRecords, 2, &delete(topic, &[(0, -1)])).await;
        assert_eq!(results(r), [(code, -1)], "{topic}");
    }
}

#[tokio::test]
async fn partitions_are_not_added_and_log_dirs_list_every_partition_with_its_size() {
    use kafka_protocol::messages::create_partitions_request::CreatePartitionsTopic;
    use kafka_protocol::messages::describe_log_dirs_request::DescribableLogDirTopic;
    use kafka_protocol::messages::{
        CreatePartitionsRequest, CreatePartitionsResponse, DescribeLogDirsRequest,
        DescribeLogDirsResponse,
    };
    const INVALID_PARTITIONS: i16 = 37;
    let (addr, broker) = server().await;
    topic(&broker, "a", 2).await;
    topic(&broker, "b", 1).await;
    let event =
        spate_broker::Event::from_json(serde_json::json!({"type": "t", "data": "x"})).unwrap();
    broker.publish("b", vec![event]).await.unwrap();
    let mut s = TcpStream::connect(&addr).await.unwrap();
    let r: CreatePartitionsResponse = call(
        &mut s,
        ApiKey::CreatePartitions,
        3,
        &CreatePartitionsRequest::default().with_topics(
            [("a", 4), ("a", 2), ("nope", 3)]
                .into_iter()
                .map(|(name, count)| {
                    CreatePartitionsTopic::default()
                        .with_name(TopicName(StrBytes::from_static_str(name)))
                        .with_count(count)
                })
                .collect(),
        ),
    )
    .await;
    let codes: Vec<i16> = r.results.iter().map(|t| t.error_code).collect();
    assert_eq!(codes, [INVALID_PARTITIONS, INVALID_PARTITIONS, 3]);
    let message = r.results[0].error_message.as_ref().unwrap().to_string();
    assert!(message.contains("keeps the 2 partitions"), "{message}");
    assert_eq!(broker.topic("a").unwrap().partitions.len(), 2);

    for version in [1, 4] {
        // Every topic, then only topic b.
        for topics in [
            None,
            Some(vec![
                DescribableLogDirTopic::default()
                    .with_topic(TopicName(StrBytes::from_static_str("b")))
                    .with_partitions(vec![0]),
            ]),
        ] {
            let only_b = topics.is_some();
            let r: DescribeLogDirsResponse = call(
                &mut s,
                ApiKey::DescribeLogDirs,
                version,
                &DescribeLogDirsRequest::default().with_topics(topics),
            )
            .await;
            assert_eq!(r.results.len(), 1);
            let dir = &r.results[0];
            let listed: Vec<(String, Vec<(i32, i64)>)> = dir
                .topics
                .iter()
                .map(|t| {
                    (
                        t.name.0.to_string(),
                        t.partitions
                            .iter()
                            .map(|p| (p.partition_index, p.partition_size))
                            .collect(),
                    )
                })
                .collect();
            let b_size = broker.topic("b").unwrap().partitions[0].info().size_bytes as i64;
            assert!(b_size > 0);
            let want_b = ("b".to_string(), vec![(0, b_size)]);
            if only_b {
                assert_eq!(listed, [want_b]);
            } else {
                assert!(listed.contains(&want_b), "{listed:?}");
                assert!(
                    listed.contains(&("a".to_string(), vec![(0, 0), (1, 0)])),
                    "{listed:?}"
                );
            }
            if version >= 4 {
                // The in-memory disk of this test has no file system to measure.
                assert!(dir.total_bytes == -1 || dir.total_bytes >= dir.usable_bytes);
            }
        }
    }
}

#[tokio::test]
async fn a_read_only_token_fetches_but_every_change_is_refused_with_an_authorization_code() {
    use kafka_protocol::messages::delete_records_request::{
        DeleteRecordsPartition, DeleteRecordsTopic,
    };
    use kafka_protocol::messages::delete_topics_request::DeleteTopicState;
    use kafka_protocol::messages::offset_delete_request::{
        OffsetDeleteRequestPartition, OffsetDeleteRequestTopic,
    };
    use kafka_protocol::messages::{
        CreateTopicsRequest, CreateTopicsResponse, DeleteGroupsRequest, DeleteGroupsResponse,
        DeleteRecordsRequest, DeleteRecordsResponse, DeleteTopicsRequest, DeleteTopicsResponse,
        GroupId, IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse,
        OffsetDeleteRequest, OffsetDeleteResponse,
    };
    let (addr, broker) = server_with(Some(
        "full-token-0123456789\nreader-token-0123456789 read-only\n",
    ))
    .await;
    topic(&broker, "t", 1).await;
    let mut s = authenticated(&addr, "reader", "reader-token-0123456789").await;
    let name = || TopicName(StrBytes::from_static_str("t"));
    // Reads are served.
    let m: MetadataResponse = call(
        &mut s,
        ApiKey::Metadata,
        9,
        &MetadataRequest::default().with_topics(None),
    )
    .await;
    assert!(m.topics.iter().any(|t| t.name == Some(name())));
    // Produce, at acks -1 and 0: TOPIC_AUTHORIZATION_FAILED, nothing written.
    let mut batch = spate_log::batch::encode(&[spate_log::batch::NewRecord {
        timestamp_ms: 1,
        value: Some(b"v".to_vec()),
        ..Default::default()
    }])
    .unwrap();
    spate_log::batch::set_base_offset(&mut batch, 0);
    let r: ProduceResponse =
        call(&mut s, ApiKey::Produce, 9, &produce("t", 0, batch.clone())).await;
    assert_eq!(r.responses[0].partition_responses[0].error_code, 29);
    s.write_all(&frame(
        ApiKey::Produce,
        9,
        8,
        &produce("t", 0, batch).with_acks(0),
    ))
    .await
    .unwrap();
    let p: InitProducerIdResponse = call(
        &mut s,
        ApiKey::InitProducerId,
        1,
        &InitProducerIdRequest::default(),
    )
    .await;
    assert_eq!(p.error_code, 31, "CLUSTER_AUTHORIZATION_FAILED");
    // Creating, deleting and altering topics, deleting records, groups and offsets.
    let c: CreateTopicsResponse = call(
        &mut s,
        ApiKey::CreateTopics,
        4,
        &CreateTopicsRequest::default().with_topics(vec![
            kafka_protocol::messages::create_topics_request::CreatableTopic::default()
                .with_name(TopicName(StrBytes::from_static_str("new")))
                .with_num_partitions(1)
                .with_replication_factor(1),
        ]),
    )
    .await;
    assert_eq!(c.topics[0].error_code, 29);
    let d: DeleteTopicsResponse = call(
        &mut s,
        ApiKey::DeleteTopics,
        6,
        &DeleteTopicsRequest::default()
            .with_topics(vec![DeleteTopicState::default().with_name(Some(name()))]),
    )
    .await;
    assert_eq!(d.responses[0].error_code, 29);
    let r: DeleteRecordsResponse = call(
        &mut s,
        ApiKey::DeleteRecords,
        1,
        &DeleteRecordsRequest::default().with_topics(vec![
            DeleteRecordsTopic::default()
                .with_name(name())
                .with_partitions(vec![
                    DeleteRecordsPartition::default()
                        .with_partition_index(0)
                        .with_offset(-1),
                ]),
        ]),
    )
    .await;
    assert_eq!(r.topics[0].partitions[0].error_code, 29);
    let i: IncrementalAlterConfigsResponse = call(
        &mut s,
        ApiKey::IncrementalAlterConfigs,
        0,
        &IncrementalAlterConfigsRequest::default().with_resources(vec![incremental(
            2,
            "t",
            &[("retention.ms", 0, Some("1000"))],
        )]),
    )
    .await;
    assert_eq!(i.responses[0].error_code, 29);
    let g: DeleteGroupsResponse = call(
        &mut s,
        ApiKey::DeleteGroups,
        1,
        &DeleteGroupsRequest::default()
            .with_groups_names(vec![GroupId(StrBytes::from_static_str("g"))]),
    )
    .await;
    assert_eq!(g.results[0].error_code, 30);
    let o: OffsetDeleteResponse = call(
        &mut s,
        ApiKey::OffsetDelete,
        0,
        &OffsetDeleteRequest::default()
            .with_group_id(GroupId(StrBytes::from_static_str("g")))
            .with_topics(vec![
                OffsetDeleteRequestTopic::default()
                    .with_name(name())
                    .with_partitions(vec![
                        OffsetDeleteRequestPartition::default().with_partition_index(0),
                    ]),
            ]),
    )
    .await;
    assert_eq!(o.error_code, 30);
    // Nothing changed: one topic, empty, with its settings.
    let t = broker.topic("t").unwrap();
    assert_eq!(t.partitions[0].high_watermark(), 0);
    assert!(broker.topic("new").is_err());
    assert_ne!(t.config().retention_ms, Some(1000));
}
