//! Frames over an async byte stream: a cancel-safe reader and a buffered
//! writer, both reusing their buffers across frames.
//!
//! The reader keeps one `BytesMut` and hands out frames as `Bytes` split off
//! its front; once those are dropped, `reserve` reclaims the space, so a
//! steady connection allocates nothing per frame. `read_message` is cancel
//! safe (it only awaits `read_buf`), so connection loops can `select!` on it.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};

use super::codec::{DecodeError, Message, decode_body, encode_split, take_frame};

/// Room kept free in the read buffer before each read from the socket.
const READ_CHUNK: usize = 256 * 1024;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection I/O failed")]
    Io(#[from] std::io::Error),
    #[error("undecodable frame")]
    Decode(#[from] DecodeError),
    #[error("connection closed in the middle of a frame")]
    UnexpectedEof,
}

/// Reads frames from `R`.
pub struct FrameReader<R> {
    inner: R,
    buf: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: BytesMut::with_capacity(READ_CHUNK),
        }
    }

    /// The next frame's verified body; `None` on a clean close between
    /// frames. Cancel safe.
    pub async fn read_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        loop {
            if let Some(body) = take_frame(&mut self.buf)? {
                return Ok(Some(body));
            }
            if self.buf.capacity() - self.buf.len() < READ_CHUNK / 4 {
                self.buf.reserve(READ_CHUNK);
            }
            if self.inner.read_buf(&mut self.buf).await? == 0 {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(FrameError::UnexpectedEof)
                };
            }
        }
    }

    /// The next message if a whole frame is already buffered; never reads
    /// from the stream. Lets a server take a burst of pipelined requests in
    /// one go.
    pub fn try_buffered(&mut self) -> Result<Option<Message>, FrameError> {
        match take_frame(&mut self.buf)? {
            Some(body) => Ok(Some(decode_body(body)?)),
            None => Ok(None),
        }
    }

    /// The next message; `None` on a clean close. Cancel safe.
    pub async fn read_message(&mut self) -> Result<Option<Message>, FrameError> {
        match self.read_frame().await? {
            Some(body) => Ok(Some(decode_body(body)?)),
            None => Ok(None),
        }
    }
}

/// Writes frames to `W` through a buffer; bulk data larger than the buffer
/// goes straight to the socket.
pub struct FrameWriter<W: AsyncWrite> {
    inner: BufWriter<W>,
    head: BytesMut,
}

impl<W: AsyncWrite + Unpin> FrameWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner: BufWriter::with_capacity(256 * 1024, inner),
            head: BytesMut::with_capacity(256),
        }
    }

    /// Queues `msg`; call [`flush`](Self::flush) to send what is queued.
    pub async fn write_message(&mut self, msg: &Message) -> std::io::Result<()> {
        self.head.clear();
        let tail = encode_split(msg, &mut self.head);
        self.inner.write_all(&self.head).await?;
        if let Some(tail) = tail {
            self.inner.write_all(&tail).await?;
        }
        Ok(())
    }

    pub async fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush().await
    }

    /// The underlying writer.
    pub fn get_ref(&self) -> &W {
        self.inner.get_ref()
    }

    /// Writes and flushes one message.
    pub async fn send(&mut self, msg: &Message) -> std::io::Result<()> {
        self.write_message(msg).await?;
        self.flush().await
    }

    pub async fn shutdown(&mut self) -> std::io::Result<()> {
        self.inner.shutdown().await
    }
}
