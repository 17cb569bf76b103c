//! A long value sent to its shard as one `SET`, its bytes streamed as they arrive, over a
//! connection of its own.
//!
//! Written in pieces, a long value cost its shard about twice what a `SET` of the same bytes
//! does: each piece is read into an argument of its own and copied into the value, and the value
//! is copied again each time it grows. One `SET` whose value is a bulk string of the whole length
//! lets Redis read the bytes straight into the buffer that becomes the value (for an argument of
//! 32 KiB or more it sizes its read buffer to the argument and keeps it), so the shard copies
//! nothing. The Redis client cannot send an argument it does not hold whole, so this writes the
//! command itself, on a connection opened as the pool's are (TLS, `AUTH`, `SELECT`) and closed
//! with the write: a partly sent command on it belongs to no one else, and a write given up
//! halfway closes the connection before the shard ever runs the command, leaving nothing.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::{Error, ErrorKind};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

use super::{Direct, Shard, ShardError};

/// The longest reply line read (an error message).
const MAX_REPLY: usize = 4096;

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Direct {
    /// Connects, with TLS when the pool uses it, and authenticates and selects the database as
    /// the pool does.
    async fn open(&self) -> Result<Box<dyn Io>, Error> {
        let connect = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port)).await?;
            tcp.set_nodelay(true)?;
            let mut io: Box<dyn Io> = match &self.tls {
                Some(tls) => {
                    let name = rustls::pki_types::ServerName::try_from(self.host.clone())
                        .map_err(|e| Error::new(ErrorKind::Tls, e.to_string()))?;
                    let connector = tokio_rustls::TlsConnector::from(tls.clone());
                    Box::new(connector.connect(name, tcp).await?)
                }
                None => Box::new(tcp),
            };
            if let Some(password) = &self.password {
                let mut words = vec!["AUTH".as_bytes()];
                if let Some(user) = &self.username {
                    words.push(user.as_bytes());
                }
                words.push(password.as_bytes());
                command(&mut io, &words).await.map_err(|e| {
                    // The pool reports a refused password as an authentication failure.
                    if e.kind() == &ErrorKind::Unknown {
                        Error::new(ErrorKind::Auth, e.details().to_owned())
                    } else {
                        e
                    }
                })?;
            }
            if let Some(db) = self.database {
                command(&mut io, &[b"SELECT", db.to_string().as_bytes()]).await?;
            }
            Ok::<_, Error>(io)
        };
        match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(io) => io,
            Err(_) => Err(Error::new(ErrorKind::Timeout, "connection timed out")),
        }
    }
}

/// Sends one command and reads its answer, which must be a simple string.
async fn command(io: &mut Box<dyn Io>, words: &[&[u8]]) -> Result<(), Error> {
    let mut out = Vec::new();
    out.extend_from_slice(format!("*{}\r\n", words.len()).as_bytes());
    for w in words {
        out.extend_from_slice(format!("${}\r\n", w.len()).as_bytes());
        out.extend_from_slice(w);
        out.extend_from_slice(b"\r\n");
    }
    io.write_all(&out).await?;
    io.flush().await?;
    read_status(io).await
}

/// Reads one reply: `+…` is success, `-…` the shard's error (as fred reports it: its code and
/// message, of no kind of its own), anything else a protocol error.
async fn read_status(io: &mut Box<dyn Io>) -> Result<(), Error> {
    let mut line = Vec::with_capacity(64);
    let mut byte = [0u8; 1];
    while !line.ends_with(b"\r\n") {
        if line.len() >= MAX_REPLY {
            return Err(Error::new(ErrorKind::Protocol, "reply line too long"));
        }
        if io.read(&mut byte).await? == 0 {
            return Err(Error::new(
                ErrorKind::IO,
                "connection closed before the reply",
            ));
        }
        line.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
    match line[0] {
        b'+' => Ok(()),
        b'-' => Err(Error::new(ErrorKind::Unknown, text)),
        _ => Err(Error::new(
            ErrorKind::Protocol,
            format!("unexpected reply {:?}", String::from_utf8_lossy(&line)),
        )),
    }
}

/// `SET key value PX ttl` on its way, the value's bytes sent as they come.
pub struct Upload {
    shard: Arc<Shard>,
    io: Box<dyn Io>,
    /// Value bytes still to send.
    left: u64,
    /// The arguments after the value.
    tail: String,
}

impl Shard {
    /// Whether a value (header and body) of `len` bytes is sent as one `SET`
    /// (`redis.upload_max_bytes`).
    pub fn uploads(&self, len: u64) -> bool {
        len <= self.redis.upload_max_bytes
    }

    /// Opens a connection of its own to this shard and starts `SET key value PX ttl` for a value
    /// of `len` bytes, sending `first` of them.
    pub async fn upload(
        self: &Arc<Self>,
        key: &str,
        len: u64,
        ttl: Duration,
        first: &[u8],
    ) -> Result<Upload, ShardError> {
        self.check_up()?;
        let io = self.bounded(self.direct.open()).await?;
        let mut head = String::with_capacity(64 + key.len());
        // Writing to a String cannot fail.
        let _ = write!(
            head,
            "*5\r\n$3\r\nSET\r\n${}\r\n{key}\r\n${len}\r\n",
            key.len()
        );
        let ttl = ttl.as_millis().max(1).to_string();
        let mut upload = Upload {
            shard: self.clone(),
            io,
            left: len,
            tail: format!("\r\n$2\r\nPX\r\n${}\r\n{ttl}\r\n", ttl.len()),
        };
        upload.raw(head.as_bytes()).await?;
        upload.send(first).await?;
        Ok(upload)
    }
}

impl Upload {
    /// Sends the next bytes of the value; more than it was announced with is an error, and
    /// nothing is sent.
    pub async fn send(&mut self, data: &[u8]) -> Result<(), ShardError> {
        if data.len() as u64 > self.left {
            return Err(ShardError::Reply {
                shard: self.shard.name().to_owned(),
                source: Error::new(
                    ErrorKind::InvalidArgument,
                    "more bytes than the value was announced with",
                ),
            });
        }
        self.raw(data).await?;
        self.left -= data.len() as u64;
        Ok(())
    }

    /// Ends the command once the whole value was sent, and waits for the shard's answer.
    pub async fn finish(mut self) -> Result<(), ShardError> {
        if self.left != 0 {
            return Err(ShardError::Reply {
                shard: self.shard.name().to_owned(),
                source: Error::new(
                    ErrorKind::InvalidArgument,
                    format!("{} bytes of the value were never sent", self.left),
                ),
            });
        }
        let tail = std::mem::take(&mut self.tail);
        self.raw(tail.as_bytes()).await?;
        let started = std::time::Instant::now();
        let io = &mut self.io;
        self.shard
            .bounded(async {
                io.flush().await?;
                read_status(io).await
            })
            .await?;
        self.shard.observe(started);
        Ok(())
    }

    /// Writes bytes of the command, under the command timeout: a shard that stops reading them
    /// fails the write as any stalled command does.
    async fn raw(&mut self, data: &[u8]) -> Result<(), ShardError> {
        let io = &mut self.io;
        self.shard
            .bounded(async { Ok(io.write_all(data).await?) })
            .await
    }
}
