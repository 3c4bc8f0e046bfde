//! Serving gRPC to clients that send a socket path as `:authority`.
//!
//! kubelet's plugin watcher dials the registration socket by its bare path
//! (`grpc.DialContext(path, WithContextDialer(...))`, without
//! `WithAuthority("localhost")`, unlike its CSI client), so grpc-go sends
//! the percent-encoded path as `:authority`
//! (`%2Fvar%2Flib%2Fkubelet%2Fplugins_registry%2F...`). That is no valid
//! authority, and h2 — under tonic — resets every such stream with
//! PROTOCOL_ERROR before any service sees it: the plugin never registers.
//!
//! So each connection on such a socket is relayed, frame by frame, through
//! h2's own frame codec (its `unstable` API: framing and HPACK done by h2,
//! not re-implemented here) to the tonic server over an in-memory pipe,
//! with the `:authority` of every request replaced by `localhost`.
//! Everything else passes unchanged in both directions, so flow control,
//! pings and GOAWAY are the two peers' own. Each codec's HPACK table and
//! frame sizes follow the SETTINGS the peers send each other: the side
//! facing the client encodes within the client's limits and decodes within
//! the limits the server announced, and the other way round.

use std::future::Future;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use h2::Codec;
use h2::frame::{BytesStr, Frame, Settings};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio::net::UnixListener;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::{CsiError, CsiResult};

/// The HTTP/2 connection preface every client sends first.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Buffer of the in-memory pipe to the server, per connection.
const PIPE: usize = 256 * 1024;

/// Serves `router` on `listener` until `shutdown`, fixing every request's
/// `:authority` on the way in.
pub async fn serve(
    router: tonic::transport::server::Router,
    listener: UnixListener,
    shutdown: impl Future<Output = ()> + Send,
) -> CsiResult<()> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<DuplexStream, std::io::Error>>(16);
    let accept = tokio::spawn(async move {
        loop {
            let client = match listener.accept().await {
                Ok((client, _)) => client,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    continue;
                }
            };
            let (outer, inner) = tokio::io::duplex(PIPE);
            if tx.send(Ok(inner)).await.is_err() {
                return;
            }
            tokio::spawn(async move {
                if let Err(e) = relay(client, outer).await {
                    tracing::debug!(error = %e, "relayed connection ended");
                }
            });
        }
    });
    let result = router
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
        .await
        .map_err(|e| CsiError::Internal {
            detail: format!("the gRPC server failed: {e}"),
        });
    accept.abort();
    result
}

/// Applies the SETTINGS a peer sent (the limits of what it receives) to
/// the codec that encodes towards that peer, and to the codec that decodes
/// what the other peer sends, which now sends within those limits.
fn learn<A, B>(
    settings: &Settings,
    towards_sender: &mut Codec<A, Bytes>,
    from_other: &mut Codec<B, Bytes>,
) where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    if settings.is_ack() {
        return;
    }
    if let Some(size) = settings.header_table_size() {
        towards_sender.set_send_header_table_size(size as usize);
        from_other.set_recv_header_table_size(size as usize);
    }
    if let Some(size) = settings.max_frame_size() {
        towards_sender.set_max_send_frame_size(size as usize);
        from_other.set_max_recv_frame_size(size as usize);
    }
    if let Some(size) = settings.max_header_list_size() {
        from_other.set_max_recv_header_list_size(size as usize);
    }
}

/// Relays one connection (see the module doc).
async fn relay<C, S>(mut client: C, mut server: S) -> std::io::Result<()>
where
    C: AsyncRead + AsyncWrite + Unpin,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut preface = [0u8; 24];
    client.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(std::io::Error::other("not an HTTP/2 connection preface"));
    }
    server.write_all(&preface).await?;
    let mut from_client: Codec<C, Bytes> = Codec::new(client);
    let mut to_server: Codec<S, Bytes> = Codec::new(server);
    let localhost =
        BytesStr::try_from(Bytes::from_static(b"localhost")).map_err(std::io::Error::other)?;
    loop {
        tokio::select! {
            frame = from_client.next() => {
                let Some(frame) = frame else { return Ok(()) };
                let mut frame = frame.map_err(|e| std::io::Error::other(format!("{e:?}")))?;
                match &mut frame {
                    Frame::Headers(headers) => {
                        let pseudo = headers.pseudo_mut();
                        if pseudo.authority.is_some() {
                            pseudo.authority = Some(localhost.clone());
                        }
                    }
                    Frame::Settings(settings) => learn(settings, &mut from_client, &mut to_server),
                    _ => {}
                }
                to_server.send(frame).await.map_err(std::io::Error::other)?;
            }
            frame = to_server.next() => {
                let Some(frame) = frame else { return Ok(()) };
                let frame = frame.map_err(|e| std::io::Error::other(format!("{e:?}")))?;
                if let Frame::Settings(settings) = &frame {
                    learn(settings, &mut to_server, &mut from_client);
                }
                from_client.send(frame).await.map_err(std::io::Error::other)?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use h2::frame::{Data, Headers, Pseudo, StreamId};
    use http::{HeaderMap, HeaderValue, Method};
    use prost::Message;
    use tokio::net::UnixStream;
    use tonic::transport::Server;

    use super::*;
    use crate::proto::registration::PluginInfo;
    use crate::proto::registration::registration_server::RegistrationServer;
    use crate::registration::{RegistrationService, RegistrationState};

    /// Calls `Registration/GetInfo` as kubelet's plugin watcher does: over
    /// the socket with the percent-encoded socket path as `:authority`
    /// (grpc-go's `encodeAuthority` of a passthrough target).
    async fn get_info_like_kubelet(socket: &Path) -> Result<PluginInfo, String> {
        let mut io = UnixStream::connect(socket)
            .await
            .map_err(|e| e.to_string())?;
        io.write_all(PREFACE).await.map_err(|e| e.to_string())?;
        let mut codec: Codec<UnixStream, Bytes> = Codec::new(io);
        let fail = |e: &dyn std::fmt::Debug| format!("{e:?}");
        codec
            .send(Frame::Settings(Settings::default()))
            .await
            .map_err(|e| fail(&e))?;
        let authority: String = socket
            .display()
            .to_string()
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                    (b as char).to_string()
                }
                other => format!("%{other:02X}"),
            })
            .collect();
        let text = |s: &str| {
            BytesStr::try_from(Bytes::copy_from_slice(s.as_bytes())).map_err(|e| e.to_string())
        };
        let pseudo = Pseudo {
            method: Some(Method::POST),
            scheme: Some(text("http")?),
            authority: Some(text(&authority)?),
            path: Some(text("/pluginregistration.Registration/GetInfo")?),
            protocol: None,
            status: None,
        };
        let mut fields = HeaderMap::new();
        fields.insert("content-type", HeaderValue::from_static("application/grpc"));
        fields.insert("te", HeaderValue::from_static("trailers"));
        let stream = StreamId::from(1);
        codec
            .send(Frame::Headers(Headers::new(stream, pseudo, fields)))
            .await
            .map_err(|e| fail(&e))?;
        let mut data = Data::new(stream, Bytes::from_static(&[0, 0, 0, 0, 0]));
        data.set_end_stream(true);
        codec.send(Frame::Data(data)).await.map_err(|e| fail(&e))?;
        let mut body = Vec::new();
        loop {
            let frame = codec
                .next()
                .await
                .ok_or("the server closed the connection")?
                .map_err(|e| fail(&e))?;
            match frame {
                Frame::Settings(s) if !s.is_ack() => {
                    codec
                        .send(Frame::Settings(Settings::ack()))
                        .await
                        .map_err(|e| fail(&e))?;
                }
                Frame::Data(d) => body.extend_from_slice(d.payload()),
                Frame::Headers(h) if h.is_end_stream() => break,
                Frame::Reset(r) => return Err(format!("RST_STREAM {:?}", r.reason())),
                Frame::GoAway(g) => return Err(format!("GOAWAY {:?}", g.reason())),
                _ => {}
            }
        }
        let message = body.get(5..).ok_or("no gRPC message in the response")?;
        PluginInfo::decode(message).map_err(|e| e.to_string())
    }

    async fn registration_on(socket: &Path, relay: bool) -> tokio::task::JoinHandle<CsiResult<()>> {
        let listener = crate::server::bind(socket).expect("bind");
        let router = Server::builder().add_service(RegistrationServer::new(
            RegistrationService::new("/run/csi.sock".into(), RegistrationState::default()),
        ));
        let never = std::future::pending::<()>();
        if relay {
            tokio::spawn(serve(router, listener, never))
        } else {
            tokio::spawn(crate::server::serve(router, listener, never))
        }
    }

    #[tokio::test]
    async fn kubelets_registration_call_is_refused_by_h2_alone_and_answered_through_the_relay() {
        let dir = tempfile::tempdir().expect("temp dir");
        let plain = dir.path().join("plain-reg.sock");
        let fixed = dir.path().join("csi.twinvol.io-reg.sock");
        let a = registration_on(&plain, false).await;
        let b = registration_on(&fixed, true).await;
        let refused = get_info_like_kubelet(&plain).await;
        assert!(
            refused
                .as_ref()
                .is_err_and(|e| e.contains("PROTOCOL_ERROR")),
            "h2 itself refuses the path as :authority: {refused:?}"
        );
        let info = get_info_like_kubelet(&fixed)
            .await
            .expect("answered through the relay");
        assert_eq!(info.r#type, "CSIPlugin");
        assert_eq!(info.name, "csi.twinvol.io");
        assert_eq!(info.endpoint, "/run/csi.sock");
        assert_eq!(info.supported_versions, ["1.0.0"]);
        a.abort();
        b.abort();
    }
}
