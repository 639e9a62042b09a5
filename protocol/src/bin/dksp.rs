//! `dksp [host:port]`: a command-line DKSP client, so a machine without `nc` still has one.
//!
//! On a terminal it is an interactive prompt with line editing and history; otherwise it copies
//! standard input to the server and the server's replies to standard output, like `nc`.
//!
//! With `--tls`, `--cluster-secret-file` or `--user` it first sets the connection up (TLS, the
//! cluster handshake, `AUTH`) on a tokio thread, which then relays between the server and the
//! plain socket pair the rest of this program uses, so the prompt and the pipe work the same
//! either way.

use clap::Parser;
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use protocol::trust::{Challenge, ClusterSecret, Stream, TlsConfig, Trust};

#[derive(Parser)]
#[command(
    version,
    about = "DKSP command-line client (kvstore, sequencer, logserver)"
)]
struct Args {
    /// Server address; the kvstore by default.
    #[arg(default_value = "127.0.0.1:10000")]
    addr: String,
    /// Connect with TLS, checking the server against --tls-ca.
    #[arg(long)]
    tls: bool,
    /// The CA that signed the servers' certificates (PEM); `make run TLS=1` writes
    /// data/tls/ca.pem.
    #[arg(long, value_name = "FILE", default_value = "data/tls/ca.pem")]
    tls_ca: PathBuf,
    /// A client certificate (PEM) to present, with --tls-key: a cluster member's, for the
    /// sequencer and logservers.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Prove cluster membership with this secret (the sequencer and logservers, without TLS).
    #[arg(long, value_name = "FILE")]
    cluster_secret_file: Option<PathBuf>,
    /// Authenticate to the kvstore as this user; the password is read from $DTKV_PASSWORD or,
    /// if unset, from the first line of standard input.
    #[arg(long)]
    user: Option<String>,
}

fn fail(what: impl std::fmt::Display) -> ! {
    eprintln!("dksp: {what}");
    std::process::exit(1);
}

fn main() {
    let args = Args::parse();
    let plain = !args.tls && args.cluster_secret_file.is_none() && args.user.is_none();
    let result = if plain {
        let stream = match TcpStream::connect(&args.addr) {
            Ok(s) => s,
            Err(e) => fail(format!("cannot connect to {}: {e}", args.addr)),
        };
        let _ = stream.set_nodelay(true);
        run(Link::Tcp(stream), &args.addr)
    } else {
        run(Link::Relay(relay(&args)), &args.addr)
    };
    if let Err(e) = result {
        fail(e);
    }
}

fn run(link: Link, addr: &str) -> io::Result<()> {
    if io::stdin().is_terminal() {
        interactive(link, addr)
    } else {
        pipe(link)
    }
}

/// The socket the rest of the program talks through: the server itself, or the relay's end.
enum Link {
    Tcp(TcpStream),
    Relay(UnixStream),
}

impl Link {
    fn try_clone(&self) -> io::Result<Link> {
        Ok(match self {
            Link::Tcp(s) => Link::Tcp(s.try_clone()?),
            Link::Relay(s) => Link::Relay(s.try_clone()?),
        })
    }

    fn shutdown_write(&self) -> io::Result<()> {
        match self {
            Link::Tcp(s) => s.shutdown(Shutdown::Write),
            Link::Relay(s) => s.shutdown(Shutdown::Write),
        }
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Tcp(s) => s.read(buf),
            Link::Relay(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Link::Tcp(s) => s.write(buf),
            Link::Relay(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Link::Tcp(s) => s.flush(),
            Link::Relay(s) => s.flush(),
        }
    }
}

/// Sets the connection up on a tokio thread and returns this side of the relay to it. Exits
/// the process with a message if the set-up fails.
fn relay(args: &Args) -> UnixStream {
    let trust = trust(args).unwrap_or_else(|e| fail(e));
    let password = args.user.as_ref().map(|_| password());
    let (ours, theirs) = UnixStream::pair().unwrap_or_else(|e| fail(format!("socketpair: {e}")));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(format!("tokio: {e}")));
    let addr = args.addr.clone();
    let user = args.user.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
    std::thread::spawn(move || {
        rt.block_on(async move {
            let set_up = async {
                let mut s = trust
                    .dial(&addr)
                    .await
                    .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
                if let Some(secret) = trust.secret.as_ref().filter(|_| !s.is_tls()) {
                    prove(&mut s, secret).await?;
                }
                if let (Some(user), Some(pw)) = (&user, &password) {
                    let line = protocol::cmd::encode("AUTH", &[user.as_bytes(), pw.as_bytes()]);
                    let reply = exchange(&mut s, &line).await?;
                    if !reply.starts_with(b"OK") {
                        return Err(format!("AUTH: {}", String::from_utf8_lossy(&reply)));
                    }
                }
                Ok::<Stream, String>(s)
            };
            let mut server = match set_up.await {
                Ok(s) => s,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            let _ = ready_tx.send(Ok(()));
            let Ok(mut local) = theirs
                .set_nonblocking(true)
                .and_then(|_| tokio::net::UnixStream::from_std(theirs))
            else {
                return;
            };
            let _ = tokio::io::copy_bidirectional(&mut local, &mut server).await;
        })
    });
    match ready_rx.recv() {
        Ok(Ok(())) => ours,
        Ok(Err(e)) => fail(e),
        Err(_) => fail("the connection thread ended"),
    }
}

fn trust(args: &Args) -> Result<Trust, String> {
    let secret = match &args.cluster_secret_file {
        Some(p) => Some(std::sync::Arc::new(
            ClusterSecret::load(p).map_err(|e| e.to_string())?,
        )),
        None => None,
    };
    let tls = if !args.tls {
        None
    } else {
        Some(
            match (&args.tls_cert, &args.tls_key) {
                (Some(c), Some(k)) => TlsConfig::member(c, k, &args.tls_ca),
                _ => TlsConfig::client_only(&args.tls_ca),
            }
            .map_err(|e| e.to_string())?,
        )
    };
    Ok(Trust { secret, tls })
}

fn password() -> String {
    if let Ok(p) = std::env::var("DTKV_PASSWORD") {
        return p;
    }
    if io::stdin().is_terminal() {
        eprint!("password: ");
    }
    let mut line = String::new();
    if io::stdin().lock().read_line(&mut line).is_err() {
        fail("cannot read the password from standard input");
    }
    line.trim_end_matches(['\r', '\n']).to_string()
}

/// Sends one request line and reads its one-line reply (set-up only: no pipelining yet, so
/// nothing is read past the reply).
async fn exchange(s: &mut Stream, line: &[u8]) -> Result<Vec<u8>, String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = |e: io::Error| format!("during set-up: {e}");
    s.write_all(line).await.map_err(io)?;
    s.write_all(b"\n").await.map_err(io)?;
    s.flush().await.map_err(io)?;
    let mut reply = Vec::new();
    loop {
        let b = s.read_u8().await.map_err(io)?;
        if b == b'\n' || reply.len() > 4096 {
            return Ok(reply);
        }
        reply.push(b);
    }
}

/// The cluster handshake (see `protocol::trust`).
async fn prove(s: &mut Stream, secret: &ClusterSecret) -> Result<(), String> {
    let hello = exchange(s, b"HELLO").await?;
    let nonce = hello
        .strip_prefix(b"OK ")
        .ok_or_else(|| format!("HELLO: {}", String::from_utf8_lossy(&hello)))?;
    let challenge = Challenge::answer(secret, nonce).map_err(|e| e.to_string())?;
    let answer = exchange(s, &challenge.line).await?;
    let proof = answer
        .strip_prefix(b"OK ")
        .ok_or_else(|| format!("CLUSTER: {}", String::from_utf8_lossy(&answer)))?;
    challenge.check(secret, proof).map_err(|e| e.to_string())
}

/// Copies stdin to the server and replies to stdout until the server closes.
fn pipe(link: Link) -> io::Result<()> {
    let mut to_server = link.try_clone()?;
    let writer = std::thread::spawn(move || -> io::Result<()> {
        io::copy(&mut io::stdin().lock(), &mut to_server)?;
        // Half-close: the server answers what it has and then closes.
        to_server.shutdown_write()
    });
    let mut from_server = link;
    let mut out = io::stdout().lock();
    let mut buf = [0u8; 64 * 1024];
    loop {
        let n = from_server.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.write_all(&buf[..n])?;
        out.flush()?;
    }
    // The writer may still block on stdin if the server closed first; it dies with the process.
    if writer.is_finished() {
        writer
            .join()
            .map_err(|_| io::Error::other("stdin thread panicked"))??;
    }
    Ok(())
}

/// Reads one request per prompt and prints its reply lines.
fn interactive(link: Link, addr: &str) -> io::Result<()> {
    let mut editor = rustyline::DefaultEditor::new().map_err(io::Error::other)?;
    let history = std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".dksp_history"));
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    let mut to_server = link.try_clone()?;
    let mut from_server = BufReader::new(link);
    let prompt = format!("{addr}> ");
    let mut result = Ok(());
    loop {
        let line = match editor.readline(&prompt) {
            Ok(l) => l,
            Err(rustyline::error::ReadlineError::Interrupted) => continue,
            Err(rustyline::error::ReadlineError::Eof) => break,
            Err(e) => {
                result = Err(io::Error::other(e));
                break;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        // An `AUTH` line holds a password: it is sent, never written to ~/.dksp_history.
        let is_auth = line
            .split_whitespace()
            .next()
            .is_some_and(|v| v.eq_ignore_ascii_case("AUTH"));
        if !is_auth {
            let _ = editor.add_history_entry(line.as_str());
        }
        if let Err(e) = to_server
            .write_all(line.as_bytes())
            .and_then(|_| to_server.write_all(b"\n"))
        {
            result = Err(e);
            break;
        }
        match print_reply(&mut from_server) {
            Ok(true) => {}
            Ok(false) => {
                println!("(connection closed by server)");
                break;
            }
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    if let Some(h) = &history {
        let _ = editor.save_history(h);
    }
    result
}

/// Prints one reply: a single line, or rows (`KV`, `ENTRY`) up to `END`. `TAIL` streams rows
/// until the connection closes. Returns false once the server has closed.
fn print_reply(from_server: &mut impl BufRead) -> io::Result<bool> {
    let mut line = String::new();
    loop {
        line.clear();
        if from_server.read_line(&mut line)? == 0 {
            return Ok(false);
        }
        print!("{line}");
        io::stdout().flush()?;
        if !(line.starts_with("KV ") || line.starts_with("ENTRY ")) {
            return Ok(true);
        }
    }
}
