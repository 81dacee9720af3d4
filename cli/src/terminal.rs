//! `hearth console VM`: the terminal in raw mode, bridged to the console WebSocket.
//! Ctrl-] detaches; the VM keeps running.

use std::io::{IsTerminal, Read, Write};

use anyhow::{anyhow, Context};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use super::ApiClient;

/// The detach key: Ctrl-] (0x1d), as in telnet and virsh.
pub const ESCAPE: u8 = 0x1d;

/// Puts a terminal into raw mode and restores it when dropped.
struct RawMode {
    fd: i32,
    saved: libc::termios,
}

impl RawMode {
    fn enable(fd: i32) -> Option<Self> {
        // SAFETY: termios is plain data; tcgetattr fills it for a valid fd.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write into.
        if unsafe { libc::tcgetattr(fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw only edits the struct it is given.
        unsafe { libc::cfmakeraw(&mut raw) };
        // SAFETY: `raw` is a valid termios derived from the current settings.
        if unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(Self { fd, saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores settings read from the same fd earlier.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

pub async fn attach(api: &ApiClient, vm: &str, write: bool) -> anyhow::Result<()> {
    let ws_base = api.base().replacen("http://", "ws://", 1);
    let path = api.path(&format!("/v1/vms/{vm}/console?write={write}"));
    let mut req = format!("{ws_base}{path}").into_client_request()?;
    req.headers_mut()
        .insert(http::header::AUTHORIZATION, format!("Bearer {}", api.key()).parse()?);
    let (ws, _) = match tokio_tungstenite::connect_async(req).await {
        Ok(ok) => ok,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body = resp.body().clone().unwrap_or_default();
            return Err(super::client::error_from(resp.status(), &body));
        }
        Err(e) => return Err(anyhow!(e)).context("cannot open the console"),
    };
    let stdin_is_tty = std::io::stdin().is_terminal();
    if stdin_is_tty {
        eprint!("Connected to {vm}'s console. Detach with Ctrl-].\r\n");
    }
    let _raw = if stdin_is_tty { RawMode::enable(0) } else { None };
    let (mut tx, mut rx) = ws.split();

    // Keystrokes come from a blocking reader thread.
    let (keys_tx, mut keys) = tokio::sync::mpsc::channel::<Vec<u8>>(64);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin();
        let mut buf = [0u8; 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if keys_tx.blocking_send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });

    let mut stdout = std::io::stdout();
    let mut stdin_open = true;
    let reason = loop {
        tokio::select! {
            msg = rx.next() => match msg {
                Some(Ok(Message::Binary(b))) => { stdout.write_all(&b)?; stdout.flush()?; }
                Some(Ok(Message::Text(t))) => { stdout.write_all(t.as_bytes())?; stdout.flush()?; }
                Some(Ok(Message::Close(frame))) => break frame.map(|f| f.reason.to_string()).filter(|r| !r.is_empty()).unwrap_or_else(|| "console closed".into()),
                Some(Ok(_)) => {}
                Some(Err(e)) => break format!("console connection lost: {e}"),
                None => break "console closed".into(),
            },
            keys_in = keys.recv(), if stdin_open => match keys_in {
                Some(k) => {
                    if let Some(pos) = k.iter().position(|&b| b == ESCAPE) {
                        if pos > 0 && write { tx.send(Message::Binary(k[..pos].to_vec().into())).await?; }
                        let _ = tx.send(Message::Close(None)).await;
                        break "detached".into();
                    }
                    if write { tx.send(Message::Binary(k.into())).await?; }
                }
                // Input ended (a pipe): keep showing output until the server closes.
                None => stdin_open = false,
            },
        }
    };
    drop(_raw);
    if stdin_is_tty {
        eprintln!("\r\n[{reason}]");
    }
    Ok(())
}
