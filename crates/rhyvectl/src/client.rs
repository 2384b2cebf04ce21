//! A control-socket client: one JSON request line out, one response line back
//! (docs/control-protocol.md).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Map, Value};

pub use vmmapi::control::{Request, PROTOCOL_VERSION, SOCKET_NAME};
/// Longest wait for one response (a pause waits up to 2 s for the vCPUs on the server side).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection to one running VM.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    path: PathBuf,
}

impl Client {
    /// Connects to `dir/control.sock` and checks the server's protocol version.
    pub fn connect(dir: &Path) -> Result<Self, String> {
        let path = dir.join(SOCKET_NAME);
        let stream = UnixStream::connect(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let _ = stream.set_read_timeout(Some(RESPONSE_TIMEOUT));
        let _ = stream.set_write_timeout(Some(RESPONSE_TIMEOUT));
        let writer = stream
            .try_clone()
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let mut c = Client {
            reader: BufReader::new(stream),
            writer,
            path,
        };
        let hello = c.call(Request::Hello, Map::new())?;
        match hello.get("version").and_then(Value::as_u64) {
            Some(PROTOCOL_VERSION) => Ok(c),
            v => Err(format!(
                "{}: server speaks protocol version {}, rhyvectl speaks {PROTOCOL_VERSION}",
                c.path.display(),
                v.map(|v| v.to_string()).unwrap_or_else(|| "?".into())
            )),
        }
    }

    /// Waits up to `d` for each response from now on (a snapshot of a large guest).
    pub fn set_response_timeout(&mut self, d: Duration) {
        let _ = self.reader.get_ref().set_read_timeout(Some(d));
    }

    /// Sends request `name` with `fields`; the response's fields on success, its error
    /// message otherwise.
    pub fn call(
        &mut self,
        request: Request,
        mut fields: Map<String, Value>,
    ) -> Result<Value, String> {
        let name = request.name();
        fields.insert("version".into(), json!(PROTOCOL_VERSION));
        fields.insert("request".into(), json!(name));
        let mut line = Value::Object(fields).to_string();
        line.push('\n');
        let io = |e: std::io::Error| format!("{}: {e}", self.path.display());
        self.writer.write_all(line.as_bytes()).map_err(io)?;
        let mut answer = String::new();
        let n = self
            .reader
            .read_line(&mut answer)
            .map_err(|e| format!("{}: {e}", self.path.display()))?;
        if n == 0 {
            return Err(format!(
                "{}: rhyve closed the connection without answering {name}",
                self.path.display()
            ));
        }
        let v: Value = serde_json::from_str(&answer)
            .map_err(|e| format!("{}: bad response to {name}: {e}", self.path.display()))?;
        if v.get("ok") == Some(&Value::Bool(true)) {
            Ok(v)
        } else {
            Err(v
                .get("error")
                .and_then(Value::as_str)
                .unwrap_or("request failed without a message")
                .to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A one-shot fake server answering each line with `answers` in turn.
    fn serve(dir: &Path, answers: Vec<&'static str>) -> std::thread::JoinHandle<Vec<String>> {
        let l = UnixListener::bind(dir.join(SOCKET_NAME)).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            let mut got = Vec::new();
            for a in answers {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                got.push(line);
                w.write_all(a.as_bytes()).unwrap();
                w.write_all(b"\n").unwrap();
            }
            got
        })
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("rhyvectl-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn requests_carry_version_and_errors_come_back_as_messages() {
        let d = scratch("calls");
        let t = serve(
            &d,
            vec![
                r#"{"version":1,"ok":true}"#,
                r#"{"version":1,"ok":false,"error":"nope"}"#,
            ],
        );
        let mut c = Client::connect(&d).unwrap();
        assert_eq!(c.call(Request::Info, Map::new()), Err("nope".to_string()));
        let sent = t.join().unwrap();
        let first: Value = serde_json::from_str(&sent[0]).unwrap();
        assert_eq!(first["request"], json!("hello"));
        assert_eq!(first["version"], json!(1));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_newer_server_is_refused() {
        let d = scratch("version");
        let t = serve(&d, vec![r#"{"version":2,"ok":true}"#]);
        let e = Client::connect(&d).err().unwrap();
        assert!(e.contains("protocol version 2"), "{e}");
        t.join().unwrap();
        let _ = std::fs::remove_dir_all(&d);
    }
}
