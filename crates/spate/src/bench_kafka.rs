//! `spate bench kafka`: a Kafka load generator that costs little CPU, to measure a Kafka-protocol
//! server (Spate or Apache Kafka) without the client being the bottleneck.
//!
//! It produces pre-encoded uncompressed record batches (only the timestamps and the CRC change per
//! request) over a few connections with many requests in flight, then fetches everything back from
//! the start. Latency is per produce request, from the moment it is written to the socket to its
//! response, counted once per record it carried.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
use kafka_protocol::messages::metadata_request::MetadataRequestTopic;
use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
use kafka_protocol::messages::{
    ApiKey, FetchRequest, FetchResponse, MetadataRequest, MetadataResponse, ProduceRequest,
    ProduceResponse, RequestHeader, ResponseHeader, TopicName,
};
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};
use spate_log::batch::{self, NewRecord};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};

/// The reading and writing halves of a connection, plain or TLS.
type Reader = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
type Writer = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;

const PRODUCE_VERSION: i16 = 9;
const FETCH_VERSION: i16 = 12;
const METADATA_VERSION: i16 = 9;

#[derive(clap::Args, Debug, Clone)]
pub struct KafkaBenchArgs {
    /// A Kafka listener (Spate's or a Kafka broker's).
    #[arg(long, default_value = "127.0.0.1:9092")]
    bootstrap: SocketAddr,
    /// An existing topic; every partition gets the same share of the records.
    #[arg(long)]
    topic: String,
    /// Records to produce (and then fetch back).
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    /// Value bytes per record (records have no key and no headers).
    #[arg(long, default_value_t = 1024)]
    record_size: usize,
    /// Record bytes per batch; every produce request carries one batch for each partition.
    #[arg(long, default_value_t = 16384)]
    batch_bytes: usize,
    /// Produce requests in flight per connection.
    #[arg(long, default_value_t = 5)]
    in_flight: usize,
    /// Producer connections.
    #[arg(long, default_value_t = 1)]
    connections: usize,
    /// acks: -1 (all), 1 or 0 is not offered (no responses, no latency).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    acks: i16,
    /// Skip fetching the records back.
    #[arg(long)]
    no_consume: bool,
    /// Connect over TLS, trusting the CA certificates in this PEM file (the listener's address
    /// must be in its certificate).
    #[arg(long, value_name = "FILE")]
    tls_ca: Option<std::path::PathBuf>,
}

pub async fn run(args: KafkaBenchArgs) -> Result<()> {
    ensure!(args.records > 0, "--records must be positive");
    ensure!(
        args.in_flight > 0 && args.connections > 0,
        "--in-flight and --connections must be positive"
    );
    ensure!(matches!(args.acks, -1 | 1), "--acks must be -1 or 1");
    bench(args).await
}

async fn bench(a: KafkaBenchArgs) -> Result<()> {
    let tls = a.tls_ca.as_deref().map(connector).transpose()?;
    let mut conn = Conn::connect(a.bootstrap, tls.as_ref()).await?;
    let partitions = conn.partitions(&a.topic).await?;
    let per_batch = (a.batch_bytes / a.record_size.max(1)).max(1) as u64;
    let per_request = per_batch * partitions as u64;
    let requests = a.records.div_ceil(per_request);
    let produced = produce(&a, tls.as_ref(), partitions, per_batch, requests).await?;
    let records = requests * per_request;
    let mib = (records * a.record_size as u64) as f64 / (1024.0 * 1024.0);
    println!(
        "produce: {records} records, {:.1} records/s, {:.2} MiB/s, request latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, {} partitions, {per_batch} records/batch, {} in flight x {} connections",
        records as f64 / produced.seconds,
        mib / produced.seconds,
        produced.hist.value_at_quantile(0.5) as f64 / 1000.0,
        produced.hist.value_at_quantile(0.99) as f64 / 1000.0,
        produced.hist.value_at_quantile(0.999) as f64 / 1000.0,
        partitions,
        a.in_flight,
        a.connections,
    );
    if !a.no_consume {
        let start = Instant::now();
        let fetched = conn.fetch_all(&a.topic, partitions, records).await?;
        let seconds = start.elapsed().as_secs_f64();
        println!(
            "consume: {fetched} records, {:.1} records/s, {:.2} MiB/s",
            fetched as f64 / seconds,
            (fetched * a.record_size as u64) as f64 / (1024.0 * 1024.0) / seconds,
        );
    }
    Ok(())
}

struct Produced {
    seconds: f64,
    hist: Histogram<u64>,
}

async fn produce(
    a: &KafkaBenchArgs,
    tls: Option<&tokio_rustls::TlsConnector>,
    partitions: i32,
    per_batch: u64,
    requests: u64,
) -> Result<Produced> {
    let records: Vec<NewRecord> = (0..per_batch)
        .map(|i| NewRecord {
            timestamp_ms: 0,
            key: None,
            value: Some(
                (0..a.record_size)
                    .map(|b| ((b * 31 + i as usize) % 251) as u8)
                    .collect(),
            ),
            headers: Vec::new(),
        })
        .collect();
    let template = Bytes::from(batch::encode(&records).context("a batch has records")?);
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..a.connections {
        let conn = Conn::connect(a.bootstrap, tls).await?;
        let (a, next, template) = (a.clone(), next.clone(), template.clone());
        tasks.spawn(async move {
            produce_on(conn, &a, partitions, per_batch, requests, &next, &template).await
        });
    }
    let mut hist = new_histogram();
    while let Some(r) = tasks.join_next().await {
        hist.add(r.context("producer task failed")??)
            .expect("same bounds");
    }
    Ok(Produced {
        seconds: start.elapsed().as_secs_f64(),
        hist,
    })
}

fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid bounds")
}

/// Sends requests while fewer than `in_flight` are unanswered; a reader task takes the responses in
/// order and checks every partition's error code.
async fn produce_on(
    conn: Conn,
    a: &KafkaBenchArgs,
    partitions: i32,
    per_batch: u64,
    requests: u64,
    next: &AtomicU64,
    template: &Bytes,
) -> Result<Histogram<u64>> {
    let Conn { rd, mut wr, .. } = conn;
    let slots = Arc::new(Semaphore::new(a.in_flight));
    let (sent_tx, sent_rx) = mpsc::unbounded_channel::<(i32, Instant)>();
    let reader = {
        let slots = slots.clone();
        let per_request = per_batch * partitions as u64;
        tokio::spawn(async move {
            let result = read_produce_responses(rd, sent_rx, &slots, per_request).await;
            // Wake the sender if the reader gave up.
            slots.close();
            result
        })
    };
    let mut correlation = 0;
    let mut out = BytesMut::new();
    while next.fetch_add(1, Ordering::Relaxed) < requests {
        match slots.acquire().await {
            Ok(permit) => permit.forget(),
            Err(_) => break,
        }
        let now_ms = spate_broker::now_ms();
        let data = (0..partitions)
            .map(|p| {
                let mut b = BytesMut::from(&template[..]);
                // Stamp the batch with the current time and seal it with a fresh CRC.
                b[27..35].copy_from_slice(&now_ms.to_be_bytes());
                b[35..43].copy_from_slice(&now_ms.to_be_bytes());
                let crc = crc32c::crc32c(&b[21..]);
                b[17..21].copy_from_slice(&crc.to_be_bytes());
                PartitionProduceData::default()
                    .with_index(p)
                    .with_records(Some(b.freeze()))
            })
            .collect();
        let request = ProduceRequest::default()
            .with_acks(a.acks)
            .with_timeout_ms(30_000)
            .with_topic_data(vec![
                TopicProduceData::default()
                    .with_name(TopicName(StrBytes::from_string(a.topic.clone())))
                    .with_partition_data(data),
            ]);
        correlation += 1;
        out.clear();
        frame(
            &mut out,
            ApiKey::Produce,
            PRODUCE_VERSION,
            correlation,
            &request,
        )?;
        let sent = Instant::now();
        // A flush pushes out what TLS holds back (nothing to do on plain TCP).
        if sent_tx.send((correlation, sent)).is_err()
            || wr.write_all(&out).await.is_err()
            || wr.flush().await.is_err()
        {
            break;
        }
    }
    drop(sent_tx);
    reader.await.context("reader task failed")?
}

async fn read_produce_responses(
    mut rd: Reader,
    mut sent: mpsc::UnboundedReceiver<(i32, Instant)>,
    slots: &Semaphore,
    records_per_request: u64,
) -> Result<Histogram<u64>> {
    let mut hist = new_histogram();
    let mut buf = BytesMut::with_capacity(1 << 16);
    while let Some((correlation, at)) = sent.recv().await {
        let mut body = read_frame(&mut rd, &mut buf).await?;
        let header =
            ResponseHeader::decode(&mut body, ProduceResponse::header_version(PRODUCE_VERSION))?;
        ensure!(
            header.correlation_id == correlation,
            "response {} for request {correlation}",
            header.correlation_id
        );
        let response = ProduceResponse::decode(&mut body, PRODUCE_VERSION)?;
        for t in &response.responses {
            for p in &t.partition_responses {
                if p.error_code != 0 {
                    bail!(
                        "produce to partition {} failed: error {}",
                        p.index,
                        p.error_code
                    );
                }
            }
        }
        let us = at.elapsed().as_micros() as u64;
        hist.record_n(us.max(1), records_per_request)
            .context("latency out of range")?;
        slots.add_permits(1);
    }
    Ok(hist)
}

/// A connection for the sequential requests (metadata, fetch).
struct Conn {
    rd: Reader,
    wr: Writer,
    buf: BytesMut,
    correlation: i32,
}

impl Conn {
    async fn connect(addr: SocketAddr, tls: Option<&tokio_rustls::TlsConnector>) -> Result<Conn> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        stream.set_nodelay(true)?;
        let (rd, wr): (Reader, Writer) = match tls {
            None => {
                let (rd, wr) = stream.into_split();
                (Box::new(rd), Box::new(wr))
            }
            Some(connector) => {
                let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
                let tls = connector
                    .connect(name, stream)
                    .await
                    .with_context(|| format!("TLS handshake with {addr}"))?;
                let (rd, wr) = tokio::io::split(tls);
                (Box::new(rd), Box::new(wr))
            }
        };
        Ok(Conn {
            rd,
            wr,
            buf: BytesMut::new(),
            correlation: 0,
        })
    }

    async fn call<Req: Encodable, Resp: Decodable>(
        &mut self,
        api: ApiKey,
        version: i16,
        request: &Req,
        response_header_version: i16,
    ) -> Result<Resp> {
        self.correlation += 1;
        let mut out = BytesMut::new();
        frame(&mut out, api, version, self.correlation, request)?;
        self.wr.write_all(&out).await?;
        self.wr.flush().await?;
        let mut body = read_frame(&mut self.rd, &mut self.buf).await?;
        let header = ResponseHeader::decode(&mut body, response_header_version)?;
        ensure!(
            header.correlation_id == self.correlation,
            "unexpected correlation id"
        );
        Resp::decode(&mut body, version)
    }

    async fn partitions(&mut self, topic: &str) -> Result<i32> {
        let request = MetadataRequest::default()
            .with_topics(Some(vec![MetadataRequestTopic::default().with_name(Some(
                TopicName(StrBytes::from_string(topic.to_string())),
            ))]));
        let response: MetadataResponse = self
            .call(
                ApiKey::Metadata,
                METADATA_VERSION,
                &request,
                MetadataResponse::header_version(METADATA_VERSION),
            )
            .await?;
        let t = response.topics.first().context("metadata names no topic")?;
        ensure!(
            t.error_code == 0,
            "topic {topic}: metadata error {}",
            t.error_code
        );
        ensure!(!t.partitions.is_empty(), "topic {topic} has no partitions");
        Ok(t.partitions.len() as i32)
    }

    /// Fetches every partition from offset 0 until `records` have been seen; returns the count.
    async fn fetch_all(&mut self, topic: &str, partitions: i32, records: u64) -> Result<u64> {
        let mut offsets = vec![0i64; partitions as usize];
        let mut seen = 0u64;
        let deadline = Instant::now() + Duration::from_secs(600);
        while seen < records {
            ensure!(
                Instant::now() < deadline,
                "only {seen} of {records} records fetched"
            );
            let request = FetchRequest::default()
                .with_replica_id(kafka_protocol::messages::BrokerId(-1))
                .with_max_wait_ms(500)
                .with_min_bytes(1)
                .with_max_bytes(50 << 20)
                .with_session_epoch(-1)
                .with_topics(vec![
                    FetchTopic::default()
                        .with_topic(TopicName(StrBytes::from_string(topic.to_string())))
                        .with_partitions(
                            offsets
                                .iter()
                                .enumerate()
                                .map(|(p, &o)| {
                                    FetchPartition::default()
                                        .with_partition(p as i32)
                                        .with_fetch_offset(o)
                                        .with_partition_max_bytes(1 << 20)
                                })
                                .collect(),
                        ),
                ]);
            let response: FetchResponse = self
                .call(
                    ApiKey::Fetch,
                    FETCH_VERSION,
                    &request,
                    FetchResponse::header_version(FETCH_VERSION),
                )
                .await?;
            ensure!(
                response.error_code == 0,
                "fetch error {}",
                response.error_code
            );
            for t in &response.responses {
                for p in &t.partitions {
                    ensure!(
                        p.error_code == 0,
                        "fetch partition {}: error {}",
                        p.partition_index,
                        p.error_code
                    );
                    let Some(bytes) = &p.records else { continue };
                    let offset = &mut offsets[p.partition_index as usize];
                    seen += count_records(bytes, offset);
                }
            }
        }
        Ok(seen)
    }
}

/// Counts the records at or after `*offset` in the whole batches of `bytes` and moves `*offset`
/// past them. A partial batch at the end (a fetch may cut one) is left for the next fetch.
fn count_records(mut bytes: &[u8], offset: &mut i64) -> u64 {
    let mut n = 0;
    while bytes.len() >= 61 {
        let base = i64::from_be_bytes(bytes[0..8].try_into().expect("8 bytes"));
        let len = i32::from_be_bytes(bytes[8..12].try_into().expect("4 bytes"));
        let total = 12 + len.max(0) as usize;
        if len < 49 || bytes.len() < total {
            break;
        }
        let last_delta = i32::from_be_bytes(bytes[23..27].try_into().expect("4 bytes"));
        let last = base + i64::from(last_delta);
        if last >= *offset {
            n += (last - (*offset).max(base) + 1) as u64;
            *offset = last + 1;
        }
        bytes = &bytes[total..];
    }
    n
}

fn frame<Req: Encodable>(
    out: &mut BytesMut,
    api: ApiKey,
    version: i16,
    correlation: i32,
    request: &Req,
) -> Result<()> {
    let start = out.len();
    out.put_i32(0);
    RequestHeader::default()
        .with_request_api_key(api as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation)
        .with_client_id(Some(StrBytes::from_static_str("spate-bench")))
        .encode(out, api.request_header_version(version))?;
    request.encode(out, version)?;
    let len = (out.len() - start - 4) as i32;
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
    Ok(())
}

async fn read_frame(rd: &mut Reader, buf: &mut BytesMut) -> Result<Bytes> {
    loop {
        if buf.len() >= 4 {
            let len = i32::from_be_bytes(buf[0..4].try_into().expect("4 bytes"));
            ensure!((0..=(512 << 20)).contains(&len), "bad response size {len}");
            if buf.len() >= 4 + len as usize {
                buf.advance(4);
                return Ok(buf.split_to(len as usize).freeze());
            }
            buf.reserve(4 + len as usize - buf.len());
        }
        if rd.read_buf(buf).await? == 0 {
            bail!("connection closed by the server");
        }
    }
}

/// A TLS client trusting the CA certificates of a PEM file.
fn connector(ca_file: &std::path::Path) -> Result<tokio_rustls::TlsConnector> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::tls::certificates(ca_file, "CA certificate")? {
        roots.add(cert)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_before_the_fetch_offset_are_not_counted() {
        let records: Vec<NewRecord> = (0..4)
            .map(|_| NewRecord {
                value: Some(vec![1; 10]),
                ..NewRecord::default()
            })
            .collect();
        let mut a = batch::encode(&records).unwrap();
        batch::set_base_offset(&mut a, 10);
        let mut b = batch::encode(&records[..2]).unwrap();
        batch::set_base_offset(&mut b, 14);
        let mut bytes = [a.clone(), b].concat();
        // A cut batch at the end is left for later.
        bytes.extend_from_slice(&a[..30]);
        let mut offset = 12;
        assert_eq!(count_records(&bytes, &mut offset), 4);
        assert_eq!(offset, 16);
        let mut offset = 16;
        assert_eq!(count_records(&bytes, &mut offset), 0);
        assert_eq!(offset, 16);
    }
}
