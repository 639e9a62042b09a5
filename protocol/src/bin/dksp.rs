//! `dksp [host:port]`: a command-line DKSP client, so a machine without `nc` still has one.
//!
//! On a terminal it is an interactive prompt with line editing and history; otherwise it copies
//! standard input to the server and the server's replies to standard output, like `nc`.

use clap::Parser;
use std::io::{self, BufRead, BufReader, IsTerminal, Read, Write};
use std::net::{Shutdown, TcpStream};

#[derive(Parser)]
#[command(
    version,
    about = "DKSP command-line client (kvstore, sequencer, logserver)"
)]
struct Args {
    /// Server address; the kvstore by default.
    #[arg(default_value = "127.0.0.1:10000")]
    addr: String,
}

fn main() {
    let args = Args::parse();
    let stream = match TcpStream::connect(&args.addr) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("dksp: cannot connect to {}: {e}", args.addr);
            std::process::exit(1);
        }
    };
    let _ = stream.set_nodelay(true);
    let result = if io::stdin().is_terminal() {
        interactive(stream, &args.addr)
    } else {
        pipe(stream)
    };
    if let Err(e) = result {
        eprintln!("dksp: {e}");
        std::process::exit(1);
    }
}

/// Copies stdin to the server and replies to stdout until the server closes.
fn pipe(stream: TcpStream) -> io::Result<()> {
    let mut to_server = stream.try_clone()?;
    let writer = std::thread::spawn(move || -> io::Result<()> {
        io::copy(&mut io::stdin().lock(), &mut to_server)?;
        // Half-close: the server answers what it has and then closes.
        to_server.shutdown(Shutdown::Write)
    });
    let mut from_server = stream;
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
fn interactive(stream: TcpStream, addr: &str) -> io::Result<()> {
    let mut editor = rustyline::DefaultEditor::new().map_err(io::Error::other)?;
    let history = std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".dksp_history"));
    if let Some(h) = &history {
        let _ = editor.load_history(h);
    }
    let mut to_server = stream.try_clone()?;
    let mut from_server = BufReader::new(stream);
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
