//! `dtkv-admin`: the operator's tool. Today: `user add|del|list` on a kvstore users file (see
//! `kvstore::users` and docs/operations.md). Each subcommand group is one enum variant and one
//! function, so new ones (backup, certificates) slot in beside `user`.
//!
//! A password is never taken as a plain argument (it would show in `ps` and in shell history):
//! it comes from `--password-file`, `--password-stdin` or the `DTKV_PASSWORD` environment
//! variable. Listings never show hashes.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::io::Read;
use std::path::{Path, PathBuf};

use kvstore::users::{Access, Grant, User, Users};
use protocol::token;

/// dtkv's administration tool.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the kvstore's users file (the kvstore's --users).
    #[command(subcommand)]
    User(UserCommand),
    /// Make a development CA and a node certificate (for localhost, 127.0.0.1 and ::1, plus
    /// any --host) for every process of a cluster on one machine: `make run TLS=1` uses it.
    /// Writes ca.pem, ca.key, node.pem and node.key (keys mode 0600) into --dir, replacing any.
    Certs {
        /// Where to write the files.
        #[arg(long)]
        dir: PathBuf,
        /// Another name or address the node certificate should be valid for (repeatable).
        #[arg(long = "host")]
        hosts: Vec<String>,
    },
}

/// The users file a `user` subcommand works on.
#[derive(Args)]
struct UsersFile {
    /// The users file (created by the first `user add`).
    #[arg(long)]
    users: PathBuf,
}

#[derive(Subcommand)]
enum UserCommand {
    /// Add a user (or, with --replace, change one's password and grants).
    Add {
        /// The user name: 1 to 64 of A-Z a-z 0-9 _ . @ -.
        name: String,
        #[command(flatten)]
        file: UsersFile,
        /// Read the password from this file (one trailing newline is dropped).
        #[arg(long, conflicts_with = "password_stdin")]
        password_file: Option<PathBuf>,
        /// Read the password from standard input (one trailing newline is dropped).
        #[arg(long)]
        password_stdin: bool,
        /// Let the user read (GET, SCAN) the keys starting with PREFIX ('' for every key).
        #[arg(long = "read", value_name = "PREFIX")]
        read: Vec<String>,
        /// Let the user write (PUT, DEL) the keys starting with PREFIX ('' for every key).
        #[arg(long = "write", value_name = "PREFIX")]
        write: Vec<String>,
        /// Both --read and --write on PREFIX.
        #[arg(long = "readwrite", value_name = "PREFIX")]
        readwrite: Vec<String>,
        /// Give the user the admin right (STATUS, HOPS).
        #[arg(long)]
        admin: bool,
        /// Replace a user of that name instead of refusing.
        #[arg(long)]
        replace: bool,
    },
    /// Remove a user.
    Del {
        /// The user name.
        name: String,
        #[command(flatten)]
        file: UsersFile,
    },
    /// List the users and their grants (never their hashes).
    List {
        #[command(flatten)]
        file: UsersFile,
    },
}

fn main() -> std::process::ExitCode {
    let done = match Cli::parse().command {
        Command::User(cmd) => user(cmd),
        Command::Certs { dir, hosts } => certs(&dir, &hosts),
    };
    match done {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One line with its causes, whatever RUST_BACKTRACE says: an answer, not a bug.
            eprintln!("dtkv-admin: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn certs(dir: &Path, hosts: &[String]) -> anyhow::Result<()> {
    let made = protocol::trust::devcerts::generate(dir, "dtkv development CA", hosts)?;
    println!(
        "--tls-cert {} --tls-key {} --tls-ca {}",
        made.cert.display(),
        made.key.display(),
        made.ca.display()
    );
    Ok(())
}

fn user(cmd: UserCommand) -> anyhow::Result<()> {
    match cmd {
        UserCommand::Add {
            name,
            file,
            password_file,
            password_stdin,
            read,
            write,
            readwrite,
            admin,
            replace,
        } => {
            let mut users = load_or_new(&file.users)?;
            let password = password(password_file.as_deref(), password_stdin)?;
            let grants: Vec<Grant> = [
                (read, Access::Read),
                (write, Access::Write),
                (readwrite, Access::ReadWrite),
            ]
            .into_iter()
            .flat_map(|(prefixes, access)| {
                prefixes
                    .into_iter()
                    .map(move |p| Grant::new(p.into_bytes(), access))
            })
            .collect();
            if grants.is_empty() {
                eprintln!("note: {name} has no grants: it can AUTH but read or write no key");
            }
            let existed = users.get(&name).is_some();
            users.add(User::new(&name, &password, grants, admin)?, replace)?;
            users.save(&file.users)?;
            let verb = if existed { "replaced" } else { "added" };
            println!("{verb} user {name} in {}", file.users.display());
        }
        UserCommand::Del { name, file } => {
            let mut users = Users::load(&file.users)?;
            users.remove(&name)?;
            users.save(&file.users)?;
            println!("removed user {name} from {}", file.users.display());
        }
        UserCommand::List { file } => {
            for u in Users::load(&file.users)?.iter() {
                println!("{}", describe(u));
            }
        }
    }
    Ok(())
}

/// `name [admin] [access prefix]...`, prefixes as DKSP tokens (so `""` is every key).
fn describe(u: &User) -> String {
    let mut words: Vec<&[u8]> = vec![u.name().as_bytes()];
    if u.is_admin() {
        words.push(b"admin");
    }
    for g in u.grants() {
        words.push(g.access.as_str().as_bytes());
        words.push(&g.prefix);
    }
    String::from_utf8_lossy(&token::join(&words)).into_owned()
}

/// The users file, or no users if it does not exist yet.
fn load_or_new(path: &Path) -> anyhow::Result<Users> {
    if path.exists() {
        Ok(Users::load(path)?)
    } else {
        Ok(Users::new())
    }
}

/// The password from the file, standard input, or `DTKV_PASSWORD`, without one trailing
/// newline.
fn password(file: Option<&Path>, stdin: bool) -> anyhow::Result<Vec<u8>> {
    let mut pw = if let Some(f) = file {
        std::fs::read(f).with_context(|| format!("reading the password from {}", f.display()))?
    } else if stdin {
        let mut pw = Vec::new();
        std::io::stdin()
            .read_to_end(&mut pw)
            .context("reading the password from standard input")?;
        pw
    } else if let Some(pw) = std::env::var_os("DTKV_PASSWORD") {
        pw.into_encoded_bytes()
    } else {
        anyhow::bail!(
            "no password: give --password-file FILE, --password-stdin, or DTKV_PASSWORD \
             (never the password itself as an argument)"
        );
    };
    if pw.ends_with(b"\n") {
        pw.pop();
        if pw.ends_with(b"\r") {
            pw.pop();
        }
    }
    anyhow::ensure!(!pw.is_empty(), "the password is empty");
    Ok(pw)
}
