//! `natter`: a command-line Natter client on the SDK.
//!
//! The session (token) and the local cache live in the config dir
//! (`--config-dir`, `NATTER_CONFIG_DIR`, default `~/.config/natter`):
//! `routers` (one address a line) and `cache.sqlite` (session, tokens,
//! conversations, messages, the outgoing queue). A chat is named by its
//! conversation id or `@username` (the direct chat with that friend).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use natter_client::{Client, Config, Event, FeedItem, Message};
use serde_json::json;

#[derive(Parser)]
#[command(name = "natter", about = "Natter command-line client")]
struct Cli {
    /// Where the session and the cache live.
    #[arg(long, env = "NATTER_CONFIG_DIR", global = true)]
    config_dir: Option<PathBuf>,
    /// Router address(es), host:port; remembered at login. Repeat for
    /// failover.
    #[arg(
        long = "router",
        env = "NATTER_ROUTERS",
        value_delimiter = ',',
        global = true
    )]
    routers: Vec<String>,
    /// Machine-readable output (JSON, one object a line for `watch`).
    #[arg(long, global = true)]
    json: bool,
    /// Seconds to wait for the cluster.
    #[arg(long, default_value_t = 30, global = true)]
    timeout: u64,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an account and log in.
    Register {
        username: String,
        #[arg(long, env = "NATTER_PASSWORD")]
        password: String,
    },
    /// Log in (the token is kept in the config dir).
    Login {
        username: String,
        #[arg(long, env = "NATTER_PASSWORD")]
        password: String,
    },
    /// Revoke the session and forget it.
    Logout,
    /// Who is logged in.
    Whoami,
    #[command(subcommand)]
    Friends(FriendsCmd),
    #[command(subcommand)]
    Chats(ChatsCmd),
    /// The conversation list.
    Feed,
    /// Send a text message.
    Send { chat: String, text: String },
    /// Upload a file and send it as a message.
    SendFile {
        chat: String,
        path: PathBuf,
        /// Text sent with the file.
        #[arg(long, default_value = "")]
        text: String,
    },
    /// The newest messages of a chat.
    History {
        chat: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Print messages as they arrive (until Ctrl-C).
    Watch,
}

#[derive(Subcommand)]
enum FriendsCmd {
    /// Ask a user (by username) to be friends.
    Request { username: String },
    /// Accept a user's request.
    Accept { username: String },
    /// Friends and pending requests.
    List,
}

#[derive(Subcommand)]
enum ChatsCmd {
    /// The direct chat with a friend.
    Direct { username: String },
    /// A new group with these members (usernames).
    Group { name: String, members: Vec<String> },
    /// The conversation list (same as `feed`).
    List,
}

fn config_dir(cli: &Cli) -> Result<PathBuf> {
    if let Some(d) = &cli.config_dir {
        return Ok(d.clone());
    }
    let home = std::env::var_os("HOME").context("HOME is not set; pass --config-dir")?;
    Ok(PathBuf::from(home).join(".config").join("natter"))
}

fn routers(cli: &Cli, dir: &Path) -> Result<Vec<String>> {
    if !cli.routers.is_empty() {
        return Ok(cli.routers.clone());
    }
    let saved = std::fs::read_to_string(dir.join("routers")).unwrap_or_default();
    let list: Vec<String> = saved
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect();
    if list.is_empty() {
        bail!("no router known: pass --router host:port");
    }
    Ok(list)
}

fn open(cli: &Cli) -> Result<(Client, PathBuf)> {
    let dir = config_dir(cli)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700));
    }
    let routers = routers(cli, &dir)?;
    let mut cfg = Config::new(routers, dir.join("cache.sqlite"));
    cfg.device = "natter CLI".into();
    cfg.call_timeout = Duration::from_secs(cli.timeout.clamp(1, 600));
    Ok((Client::open(cfg)?, dir))
}

fn save_routers(cli: &Cli, dir: &Path) -> Result<()> {
    if !cli.routers.is_empty() {
        std::fs::write(dir.join("routers"), cli.routers.join("\n") + "\n")?;
    }
    Ok(())
}

/// A chat argument: `@username` (the direct chat) or a conversation id.
async fn chat(c: &Client, arg: &str) -> Result<String> {
    match arg.strip_prefix('@') {
        Some(name) => {
            let u = c.lookup_user(name).await?;
            Ok(c.create_direct(&u.user_id).await?.id)
        }
        None => Ok(arg.to_string()),
    }
}

fn message_json(m: &Message) -> serde_json::Value {
    json!({
        "conversation_id": m.conversation_id,
        "seq": m.seq,
        "sender_id": m.sender_id,
        "client_msg_id": m.client_msg_id,
        "text": m.text,
        "media": m.media.iter().map(|x| json!({"object_id": x.object_id, "name": x.name, "size": x.size, "content_type": x.content_type})).collect::<Vec<_>>(),
        "created_at_ms": m.created_at_ms,
    })
}

fn feed_json(f: &FeedItem) -> serde_json::Value {
    json!({
        "conversation_id": f.conversation_id,
        "kind": f.kind,
        "title": f.title,
        "peer_user_id": f.peer_user_id,
        "unread_count": f.unread_count,
        "last_seq": f.last_seq,
        "preview": f.preview,
        "last_activity_ms": f.last_activity_ms,
    })
}

fn print_message(m: &Message, names: &std::collections::HashMap<String, String>) {
    let who = names
        .get(&m.sender_id)
        .cloned()
        .unwrap_or_else(|| m.sender_id.chars().take(8).collect());
    let media: Vec<String> = m
        .media
        .iter()
        .map(|x| format!("[file {} ({} bytes)]", x.name, x.size))
        .collect();
    println!("#{:<5} {who}: {} {}", m.seq, m.text, media.join(" "));
}

async fn user_names(c: &Client, ids: &[String]) -> std::collections::HashMap<String, String> {
    let mut out = std::collections::HashMap::new();
    for id in ids {
        if out.contains_key(id) {
            continue;
        }
        if let Ok(u) = c.get_user(id).await {
            out.insert(id.clone(), u.username);
        }
    }
    out
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NATTER_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(e) = run(cli).await {
        eprintln!("natter: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> Result<()> {
    let (c, dir) = open(&cli)?;
    let wait = Duration::from_secs(cli.timeout.clamp(1, 600));
    match &cli.cmd {
        Cmd::Register { username, password } => {
            let id = c.register(username, password).await?;
            let s = c.login(username, password).await?;
            save_routers(&cli, &dir)?;
            if cli.json {
                println!("{}", json!({"user_id": id, "username": s.username}));
            } else {
                println!("registered and logged in as {} ({id})", s.username);
            }
        }
        Cmd::Login { username, password } => {
            let s = c.login(username, password).await?;
            save_routers(&cli, &dir)?;
            if cli.json {
                println!(
                    "{}",
                    json!({"user_id": s.user_id, "username": s.username, "expires_at_ms": s.expires_at_ms})
                );
            } else {
                println!("logged in as {} ({})", s.username, s.user_id);
            }
        }
        Cmd::Logout => {
            c.logout().await?;
            if !cli.json {
                println!("logged out");
            }
        }
        Cmd::Whoami => {
            let s = c.session()?.ok_or_else(|| anyhow!("not logged in"))?;
            if cli.json {
                println!("{}", json!({"user_id": s.user_id, "username": s.username}));
            } else {
                println!("{} ({})", s.username, s.user_id);
            }
        }
        Cmd::Friends(FriendsCmd::Request { username }) => {
            let u = c.lookup_user(username).await?;
            let f = c.friend_request(&u.user_id).await?;
            if cli.json {
                println!("{}", json!({"user_id": f.user_id, "relation": f.relation}));
            } else {
                println!("{}: {}", u.username, f.relation);
            }
        }
        Cmd::Friends(FriendsCmd::Accept { username }) => {
            let u = c.lookup_user(username).await?;
            let f = c.friend_accept(&u.user_id).await?;
            if cli.json {
                println!("{}", json!({"user_id": f.user_id, "relation": f.relation}));
            } else {
                println!("{}: {}", u.username, f.relation);
            }
        }
        Cmd::Friends(FriendsCmd::List) => {
            let fs = c.friends().await?;
            let ids: Vec<String> = fs.iter().map(|f| f.user_id.clone()).collect();
            let names = user_names(&c, &ids).await;
            if cli.json {
                let v: Vec<_> = fs
                    .iter()
                    .map(|f| json!({"user_id": f.user_id, "username": names.get(&f.user_id), "relation": f.relation}))
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else if fs.is_empty() {
                println!("no friends yet");
            } else {
                for f in fs {
                    let n = names.get(&f.user_id).cloned().unwrap_or(f.user_id);
                    println!("{n:<32} {}", f.relation);
                }
            }
        }
        Cmd::Chats(ChatsCmd::Direct { username }) => {
            let id = chat(&c, &format!("@{username}")).await?;
            if cli.json {
                println!("{}", json!({"conversation_id": id}));
            } else {
                println!("{id}");
            }
        }
        Cmd::Chats(ChatsCmd::Group { name, members }) => {
            let mut ids = Vec::new();
            for m in members {
                ids.push(c.lookup_user(m).await?.user_id);
            }
            let g = c.create_group(name, ids).await?;
            if cli.json {
                println!(
                    "{}",
                    json!({"conversation_id": g.id, "name": g.name, "members": g.members.len()})
                );
            } else {
                println!("{}", g.id);
            }
        }
        Cmd::Chats(ChatsCmd::List) | Cmd::Feed => {
            let feed = c.fetch_feed(100).await?;
            let peers: Vec<String> = feed.iter().map(|f| f.peer_user_id.clone()).collect();
            let names = user_names(&c, &peers).await;
            if cli.json {
                println!(
                    "{}",
                    serde_json::Value::Array(feed.iter().map(feed_json).collect())
                );
            } else if feed.is_empty() {
                println!("no chats yet");
            } else {
                for f in feed {
                    let title = if f.kind == "direct" {
                        format!(
                            "@{}",
                            names.get(&f.peer_user_id).cloned().unwrap_or_default()
                        )
                    } else {
                        f.title.clone()
                    };
                    let unread = if f.unread_count > 0 {
                        format!("({} unread)", f.unread_count)
                    } else {
                        String::new()
                    };
                    println!(
                        "{:<36}  {title:<24} {unread:<12} {}",
                        f.conversation_id, f.preview
                    );
                }
            }
        }
        Cmd::Send { chat: to, text } => {
            let conv = chat(&c, to).await?;
            let id = c.send_text(&conv, text)?;
            deliver(&c, &id, wait).await?;
            if cli.json {
                println!("{}", json!({"conversation_id": conv, "client_msg_id": id}));
            } else {
                println!("sent");
            }
        }
        Cmd::SendFile {
            chat: to,
            path,
            text,
        } => {
            let conv = chat(&c, to).await?;
            let size = std::fs::metadata(path)
                .with_context(|| format!("reading {}", path.display()))?
                .len();
            let bar = indicatif::ProgressBar::new(size);
            if cli.json {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            bar.set_message("uploading");
            let b = bar.clone();
            let media = natter_client::upload::upload_file(
                &c.current_router(),
                &c.token()?,
                &conv,
                path,
                move |sent, _| b.set_position(sent),
            )
            .await;
            bar.finish_and_clear();
            let media = match media {
                Err(natter_client::Error::Api { code, .. }) if code == "not_available" => {
                    bail!("media upload is not available on this router")
                }
                other => other?,
            };
            let id = c.send(&conv, text, vec![media.clone()])?;
            deliver(&c, &id, wait).await?;
            if cli.json {
                println!(
                    "{}",
                    json!({"conversation_id": conv, "client_msg_id": id, "object_id": media.object_id, "size": media.size})
                );
            } else {
                println!("sent {} ({} bytes)", media.name, media.size);
            }
        }
        Cmd::History { chat: of, limit } => {
            let conv = chat(&c, of).await?;
            let (msgs, _) = c.history(&conv, 0, (*limit).min(100)).await?;
            if cli.json {
                println!(
                    "{}",
                    serde_json::Value::Array(msgs.iter().map(message_json).collect())
                );
            } else {
                let ids: Vec<String> = msgs.iter().map(|m| m.sender_id.clone()).collect();
                let names = user_names(&c, &ids).await;
                for m in &msgs {
                    print_message(m, &names);
                }
            }
        }
        Cmd::Watch => watch(&c, cli.json).await?,
    }
    Ok(())
}

/// Starts the SDK's sender and waits until the message is acknowledged.
async fn deliver(c: &Client, client_msg_id: &str, wait: Duration) -> Result<()> {
    let mut events = c.events().context("event stream taken")?;
    c.start()?;
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => bail!("not acknowledged within {wait:?}; it stays queued and goes out with the next command"),
            Ok(None) => bail!("the client stopped"),
            Ok(Some(Event::Sent { client_msg_id: id, .. })) if id == client_msg_id => break,
            Ok(Some(Event::SendFailed { client_msg_id: id, code, message })) if id == client_msg_id => {
                bail!("{code}: {message}")
            }
            Ok(Some(Event::SessionEnded { reason })) => bail!("session ended: {reason}; log in again"),
            Ok(Some(Event::Lagged)) => {
                // Events were dropped: the queue tells whether it left.
                if !c.pending()?.iter().any(|p| p.client_msg_id == client_msg_id) {
                    break;
                }
            }
            Ok(Some(_)) => {}
        }
    }
    c.stop();
    Ok(())
}

async fn watch(c: &Client, as_json: bool) -> Result<()> {
    let mut events = c.events().context("event stream taken")?;
    c.start()?;
    let mut names = std::collections::HashMap::new();
    let stdout = std::io::stdout();
    loop {
        let e = tokio::select! {
            e = events.recv() => e,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(e) = e else { break };
        match e {
            Event::Messages { messages, .. } => {
                for m in &messages {
                    if as_json {
                        let mut v = message_json(m);
                        v["event"] = json!("message");
                        let mut out = stdout.lock();
                        writeln!(out, "{v}")?;
                        out.flush()?;
                    } else {
                        if !names.contains_key(&m.sender_id) {
                            names.extend(user_names(c, std::slice::from_ref(&m.sender_id)).await);
                        }
                        print_message(m, &names);
                    }
                }
            }
            Event::Connected { router } => {
                if as_json {
                    println!("{}", json!({"event": "connected", "router": router}));
                } else {
                    eprintln!("connected to {router}");
                }
            }
            Event::Disconnected { router, reason } if !as_json => {
                eprintln!("disconnected from {router}: {reason}; reconnecting");
            }
            Event::SessionEnded { reason } => bail!("session ended: {reason}; log in again"),
            _ => {}
        }
    }
    c.stop();
    Ok(())
}
