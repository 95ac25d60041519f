//! A Server-Sent Events decoder following the WHATWG "event stream" parsing rules: lines end in
//! CRLF, LF or CR; `:` starts a comment; `data:` lines of one event are joined with `\n`; an empty
//! line dispatches the event. Bytes are fed as they arrive, split anywhere (even mid-character).

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
    pub id: Option<String>,
}

#[derive(Debug, Default)]
pub struct SseDecoder {
    buf: Vec<u8>,
    /// The previous chunk ended in CR: a following LF belongs to the same line end.
    skip_lf: bool,
    event: Option<String>,
    data: Vec<String>,
    id: Option<String>,
}

/// Lines longer than this (without a line end) mean a broken or hostile peer.
const MAX_LINE: usize = 1 << 20;

/// The stream sent a line longer than [`MAX_LINE`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("SSE line longer than {MAX_LINE} bytes")]
pub struct LineTooLong;

impl SseDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the events completed by them.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<SseEvent>, LineTooLong> {
        let mut out = Vec::new();
        for &b in chunk {
            if self.skip_lf {
                self.skip_lf = false;
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' | b'\n' => {
                    self.skip_lf = b == b'\r';
                    let line = std::mem::take(&mut self.buf);
                    if let Some(ev) = self.line(&line) {
                        out.push(ev);
                    }
                }
                _ => {
                    if self.buf.len() >= MAX_LINE {
                        return Err(LineTooLong);
                    }
                    self.buf.push(b);
                }
            }
        }
        Ok(out)
    }

    fn line(&mut self, line: &[u8]) -> Option<SseEvent> {
        if line.is_empty() {
            if self.data.is_empty() {
                self.event = None;
                return None;
            }
            return Some(SseEvent {
                event: self.event.take(),
                data: std::mem::take(&mut self.data).join("\n"),
                id: self.id.clone(),
            });
        }
        let line = String::from_utf8_lossy(line);
        if line.starts_with(':') {
            return None;
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line.as_ref(), ""),
        };
        match field {
            "data" => self.data.push(value.to_owned()),
            "event" => self.event = Some(value.to_owned()),
            "id" if !value.contains('\0') => self.id = Some(value.to_owned()),
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openai_style_chunks_split_anywhere() {
        let stream = b"data: {\"a\":1}\n\n: keep-alive\n\ndata: {\"b\":\"\xea\xb0\x80\"}\r\n\r\ndata: [DONE]\n\n";
        for split in 0..stream.len() {
            let mut d = SseDecoder::new();
            let mut evs = d.feed(&stream[..split]).unwrap();
            evs.extend(d.feed(&stream[split..]).unwrap());
            let data: Vec<&str> = evs.iter().map(|e| e.data.as_str()).collect();
            assert_eq!(
                data,
                ["{\"a\":1}", "{\"b\":\"가\"}", "[DONE]"],
                "split at {split}"
            );
        }
    }

    #[test]
    fn multiline_data_event_names_and_cr_only() {
        let mut d = SseDecoder::new();
        let evs = d
            .feed(b"event: x\rdata: one\rdata:two\r\rid: 7\ndata\n\n")
            .unwrap();
        assert_eq!(evs[0].event.as_deref(), Some("x"));
        assert_eq!(evs[0].data, "one\ntwo");
        assert_eq!(evs[1].data, "");
        assert_eq!(evs[1].id.as_deref(), Some("7"));
    }

    #[test]
    fn refuses_endless_lines() {
        let mut d = SseDecoder::new();
        assert!(d.feed(&vec![b'x'; MAX_LINE + 1]).is_err());
    }
}
