//! The NBD wire format: constants, and pure functions that parse and encode the
//! messages of the fixed-newstyle handshake and of the transmission phase on byte
//! slices. Nothing here does I/O, so everything here can be table-tested and fuzzed.
//!
//! All integers on the wire are big-endian.

use thiserror::Error;

/// `NBDMAGIC`, the first eight bytes a server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: the newstyle magic, and the prefix of every option the client sends.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server to client).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (client to server).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR | 1;
pub const REP_ERR_POLICY: u32 = REP_ERR | 2;
pub const REP_ERR_INVALID: u32 = REP_ERR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR | 9;

/// True for the error reply types (high bit set).
pub fn is_error_reply(reply_type: u32) -> bool {
    reply_type & REP_ERR != 0
}

/// Information types in `NBD_REP_INFO` and in the request list of `NBD_OPT_INFO`/`GO`.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Transmission flags.
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_ROTATIONAL: u16 = 1 << 4;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;
/// The export can be grown with `NBD_CMD_RESIZE` (the protocol's experimental `RESIZE`
/// extension).
pub const TFLAG_SEND_RESIZE: u16 = 1 << 9;
pub const TFLAG_SEND_FAST_ZERO: u16 = 1 << 11;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
/// Experimental `RESIZE` extension: the new size in bytes is the request's offset, its
/// length is 0. Sent only to exports that offer `NBD_FLAG_SEND_RESIZE`.
pub const CMD_RESIZE: u16 = 8;

/// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;

/// Error values in replies (they are fixed by the protocol, not the host's errno).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Largest payload of a single request (and so of a read reply) this implementation
/// accepts: 32 MiB, the limit every common client respects.
pub const MAX_REQUEST_LEN: u32 = 32 << 20;
/// Largest option payload accepted during the handshake. An option carries at most an
/// export name (4096 bytes), a length, and a list of info requests.
pub const MAX_OPTION_LEN: u32 = 16 << 10;
/// Longest string (export name, description) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

/// Bytes of the server's initial greeting.
pub const GREETING_LEN: usize = 18;
/// Bytes of an option header (magic, option, length).
pub const OPTION_HEADER_LEN: usize = 16;
/// Bytes of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Bytes of a request header.
pub const REQUEST_LEN: usize = 28;
/// Bytes of a simple reply.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Bytes the server sends after `NBD_OPT_EXPORT_NAME` (size, flags, and 124 zeroes
/// unless the client asked for none).
pub const EXPORT_NAME_REPLY_LEN: usize = 8 + 2 + 124;

/// Why bytes could not be parsed as the message they should be.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("message too short: {needed} bytes needed, {got} available")]
    Short { needed: usize, got: usize },
    #[error("bad magic {found:#x}, expected {expected:#x}")]
    BadMagic { expected: u64, found: u64 },
    #[error("option payload of {0} bytes exceeds the limit of {MAX_OPTION_LEN}")]
    OptionTooLong(u32),
    #[error("{what} of {len} bytes does not fit in the {available} bytes of the option")]
    Truncated {
        what: &'static str,
        len: usize,
        available: usize,
    },
    #[error("{0} is longer than {MAX_STRING_LEN} bytes")]
    StringTooLong(&'static str),
    #[error("{0} is not valid UTF-8 or contains NUL")]
    BadString(&'static str),
    #[error("unexpected trailing bytes after {0}")]
    Trailing(&'static str),
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

fn need(b: &[u8], n: usize) -> Result<(), ParseError> {
    if b.len() < n {
        return Err(ParseError::Short {
            needed: n,
            got: b.len(),
        });
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Handshake

/// The server's greeting: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
pub fn encode_greeting(flags: u16) -> [u8; GREETING_LEN] {
    let mut out = [0u8; GREETING_LEN];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&flags.to_be_bytes());
    out
}

/// Parses the server's greeting and returns its handshake flags. Only newstyle
/// servers are understood.
pub fn parse_greeting(b: &[u8]) -> Result<u16, ParseError> {
    need(b, GREETING_LEN)?;
    let magic = be64(b, 0);
    if magic != NBD_MAGIC {
        return Err(ParseError::BadMagic {
            expected: NBD_MAGIC,
            found: magic,
        });
    }
    let opt = be64(b, 8);
    if opt != IHAVEOPT {
        return Err(ParseError::BadMagic {
            expected: IHAVEOPT,
            found: opt,
        });
    }
    Ok(be16(b, 16))
}

/// An option header sent by the client; `len` bytes of payload follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// Parses an option header. The payload length is checked against
/// [`MAX_OPTION_LEN`] so the caller can allocate it without fear.
pub fn parse_option_header(b: &[u8]) -> Result<OptionHeader, ParseError> {
    need(b, OPTION_HEADER_LEN)?;
    let magic = be64(b, 0);
    if magic != IHAVEOPT {
        return Err(ParseError::BadMagic {
            expected: IHAVEOPT,
            found: magic,
        });
    }
    let header = OptionHeader {
        option: be32(b, 8),
        len: be32(b, 12),
    };
    if header.len > MAX_OPTION_LEN {
        return Err(ParseError::OptionTooLong(header.len));
    }
    Ok(header)
}

/// Appends an option (header and payload) to `out`.
pub fn encode_option(out: &mut Vec<u8>, option: u32, payload: &[u8]) {
    out.extend_from_slice(&IHAVEOPT.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// Appends an option reply (header and payload) to `out`.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply_type: u32, payload: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply_type.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
}

/// The header of an option reply; `len` bytes of payload follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply_type: u32,
    pub len: u32,
}

/// Parses an option reply header (client side).
pub fn parse_option_reply_header(b: &[u8]) -> Result<OptionReplyHeader, ParseError> {
    need(b, OPTION_REPLY_HEADER_LEN)?;
    let magic = be64(b, 0);
    if magic != OPTION_REPLY_MAGIC {
        return Err(ParseError::BadMagic {
            expected: OPTION_REPLY_MAGIC,
            found: magic,
        });
    }
    let header = OptionReplyHeader {
        option: be32(b, 8),
        reply_type: be32(b, 12),
        len: be32(b, 16),
    };
    if header.len > MAX_OPTION_LEN {
        return Err(ParseError::OptionTooLong(header.len));
    }
    Ok(header)
}

fn parse_string<'a>(b: &'a [u8], what: &'static str) -> Result<&'a str, ParseError> {
    if b.len() > MAX_STRING_LEN {
        return Err(ParseError::StringTooLong(what));
    }
    match std::str::from_utf8(b) {
        Ok(s) if !s.contains('\0') => Ok(s),
        _ => Err(ParseError::BadString(what)),
    }
}

/// Parses the payload of `NBD_OPT_EXPORT_NAME`: the whole payload is the name.
pub fn parse_export_name(payload: &[u8]) -> Result<&str, ParseError> {
    parse_string(payload, "export name")
}

/// The payload of `NBD_OPT_INFO` and `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest<'a> {
    pub name: &'a str,
    pub requests: Vec<u16>,
}

/// Parses the payload of `NBD_OPT_INFO`/`NBD_OPT_GO`: a name with its length, then a
/// count of information requests and the requests.
pub fn parse_info_request(payload: &[u8]) -> Result<InfoRequest<'_>, ParseError> {
    need(payload, 4)?;
    let name_len = be32(payload, 0) as usize;
    let available = payload.len() - 4;
    // The name must leave room for the 2-byte count (found by fuzzing: 4 zero bytes).
    if available < 2 || name_len > available - 2 {
        return Err(ParseError::Truncated {
            what: "export name",
            len: name_len,
            available,
        });
    }
    let name = parse_string(&payload[4..4 + name_len], "export name")?;
    let rest = &payload[4 + name_len..];
    let count = be16(rest, 0) as usize;
    let list = &rest[2..];
    if list.len() != count * 2 {
        if list.len() < count * 2 {
            return Err(ParseError::Truncated {
                what: "information request list",
                len: count * 2,
                available: list.len(),
            });
        }
        return Err(ParseError::Trailing("the information request list"));
    }
    let requests = list.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Ok(InfoRequest { name, requests })
}

/// Encodes the payload of `NBD_OPT_INFO`/`NBD_OPT_GO` (client side).
pub fn encode_info_request(name: &str, requests: &[u16]) -> Vec<u8> {
    let mut out = Vec::with_capacity(6 + name.len() + 2 * requests.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(&(requests.len() as u16).to_be_bytes());
    for r in requests {
        out.extend_from_slice(&r.to_be_bytes());
    }
    out
}

/// The payload of `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
pub fn encode_info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    out[2..10].copy_from_slice(&size.to_be_bytes());
    out[10..12].copy_from_slice(&flags.to_be_bytes());
    out
}

/// The payload of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
pub fn encode_info_block_size(minimum: u32, preferred: u32, maximum: u32) -> [u8; 14] {
    let mut out = [0u8; 14];
    out[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    out[2..6].copy_from_slice(&minimum.to_be_bytes());
    out[6..10].copy_from_slice(&preferred.to_be_bytes());
    out[10..14].copy_from_slice(&maximum.to_be_bytes());
    out
}

/// The payload of `NBD_REP_INFO` carrying a string (`NBD_INFO_NAME`,
/// `NBD_INFO_DESCRIPTION`).
pub fn encode_info_string(info: u16, s: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + s.len());
    out.extend_from_slice(&info.to_be_bytes());
    out.extend_from_slice(s.as_bytes());
    out
}

/// The payload of `NBD_REP_SERVER` (an `NBD_OPT_LIST` entry): name and description.
pub fn encode_rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + name.len() + description.len());
    out.extend_from_slice(&(name.len() as u32).to_be_bytes());
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(description.as_bytes());
    out
}

/// Information the server gave about an export in `NBD_REP_INFO` replies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Info {
    Export {
        size: u64,
        flags: u16,
    },
    BlockSize {
        minimum: u32,
        preferred: u32,
        maximum: u32,
    },
    Name(String),
    Description(String),
    /// An information type this implementation does not know; clients ignore these.
    Unknown(u16),
}

/// Parses the payload of an `NBD_REP_INFO` reply (client side).
pub fn parse_info_reply(payload: &[u8]) -> Result<Info, ParseError> {
    need(payload, 2)?;
    let info = be16(payload, 0);
    let body = &payload[2..];
    let exact = |n: usize, what: &'static str| -> Result<(), ParseError> {
        need(body, n)?;
        if body.len() != n {
            return Err(ParseError::Trailing(what));
        }
        Ok(())
    };
    Ok(match info {
        INFO_EXPORT => {
            exact(10, "NBD_INFO_EXPORT")?;
            Info::Export {
                size: be64(body, 0),
                flags: be16(body, 8),
            }
        }
        INFO_BLOCK_SIZE => {
            exact(12, "NBD_INFO_BLOCK_SIZE")?;
            Info::BlockSize {
                minimum: be32(body, 0),
                preferred: be32(body, 4),
                maximum: be32(body, 8),
            }
        }
        INFO_NAME => Info::Name(parse_string(body, "export name")?.to_string()),
        INFO_DESCRIPTION => Info::Description(parse_string(body, "export description")?.to_string()),
        other => Info::Unknown(other),
    })
}

/// Parses the payload of an `NBD_REP_SERVER` reply: the export name (and the
/// description, which follows it).
pub fn parse_rep_server(payload: &[u8]) -> Result<(String, String), ParseError> {
    need(payload, 4)?;
    let len = be32(payload, 0) as usize;
    let available = payload.len() - 4;
    if len > available {
        return Err(ParseError::Truncated {
            what: "export name",
            len,
            available,
        });
    }
    let name = parse_string(&payload[4..4 + len], "export name")?;
    let description = parse_string(&payload[4 + len..], "export description")?;
    Ok((name.to_string(), description.to_string()))
}

/// The server's reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags and, unless
/// the client set `NBD_FLAG_C_NO_ZEROES`, 124 zero bytes. Returns the filled length.
pub fn encode_export_name_reply(
    out: &mut [u8; EXPORT_NAME_REPLY_LEN],
    size: u64,
    flags: u16,
    no_zeroes: bool,
) -> usize {
    out.fill(0);
    out[0..8].copy_from_slice(&size.to_be_bytes());
    out[8..10].copy_from_slice(&flags.to_be_bytes());
    if no_zeroes {
        10
    } else {
        EXPORT_NAME_REPLY_LEN
    }
}

// ---------------------------------------------------------------------------------
// Transmission

/// A request header. For `NBD_CMD_WRITE`, `len` bytes of data follow it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: u16,
    pub cookie: u64,
    pub offset: u64,
    pub len: u32,
}

/// Parses a request header. Only the magic is checked here: whether the command,
/// flags, range and length are acceptable is the server's decision, and each has its
/// own error reply.
pub fn parse_request(b: &[u8]) -> Result<Request, ParseError> {
    need(b, REQUEST_LEN)?;
    let magic = be32(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(ParseError::BadMagic {
            expected: u64::from(REQUEST_MAGIC),
            found: u64::from(magic),
        });
    }
    Ok(Request {
        flags: be16(b, 4),
        command: be16(b, 6),
        cookie: be64(b, 8),
        offset: be64(b, 16),
        len: be32(b, 24),
    })
}

/// Encodes a request header.
pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&r.flags.to_be_bytes());
    out[6..8].copy_from_slice(&r.command.to_be_bytes());
    out[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    out[16..24].copy_from_slice(&r.offset.to_be_bytes());
    out[24..28].copy_from_slice(&r.len.to_be_bytes());
    out
}

/// Encodes a simple reply (for reads, the data follows it).
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut out = [0u8; SIMPLE_REPLY_LEN];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out
}

/// Encodes a structured reply chunk header; `len` bytes of chunk payload follow it.
pub fn encode_structured_header(flags: u16, chunk_type: u16, cookie: u64, len: u32) -> [u8; STRUCTURED_HEADER_LEN] {
    let mut out = [0u8; STRUCTURED_HEADER_LEN];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
    out
}

/// The header of an `NBD_REPLY_TYPE_OFFSET_DATA` chunk that ends the reply, with the
/// offset that starts its payload: 28 bytes, followed by `data_len` bytes of data.
pub fn encode_read_data_header(cookie: u64, offset: u64, data_len: u32) -> [u8; STRUCTURED_HEADER_LEN + 8] {
    let mut out = [0u8; STRUCTURED_HEADER_LEN + 8];
    out[..STRUCTURED_HEADER_LEN].copy_from_slice(&encode_structured_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_OFFSET_DATA,
        cookie,
        data_len + 8,
    ));
    out[STRUCTURED_HEADER_LEN..].copy_from_slice(&offset.to_be_bytes());
    out
}

/// Appends a final `NBD_REPLY_TYPE_ERROR` chunk to `out`.
pub fn encode_structured_error(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let message = truncate_utf8(message, MAX_STRING_LEN);
    let len = 4 + 2 + message.len() as u32;
    out.extend_from_slice(&encode_structured_header(
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        cookie,
        len,
    ));
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A reply header as the client sees it: the start of a simple reply or of a
/// structured reply chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// A simple reply; for a successful read the data follows.
    Simple { error: u32, cookie: u64 },
    /// A structured reply chunk; `len` bytes of chunk payload follow.
    Structured {
        flags: u16,
        chunk_type: u16,
        cookie: u64,
        len: u32,
    },
}

/// Bytes to read before [`parse_reply_header`] can tell the reply kind: both kinds
/// start with a 4-byte magic.
pub const REPLY_MAGIC_LEN: usize = 4;

/// Parses a reply header: a simple reply needs [`SIMPLE_REPLY_LEN`] bytes, a
/// structured one [`STRUCTURED_HEADER_LEN`]; `Short` says how many are needed.
pub fn parse_reply_header(b: &[u8]) -> Result<ReplyHeader, ParseError> {
    need(b, REPLY_MAGIC_LEN)?;
    match be32(b, 0) {
        SIMPLE_REPLY_MAGIC => {
            need(b, SIMPLE_REPLY_LEN)?;
            Ok(ReplyHeader::Simple {
                error: be32(b, 4),
                cookie: be64(b, 8),
            })
        }
        STRUCTURED_REPLY_MAGIC => {
            need(b, STRUCTURED_HEADER_LEN)?;
            let len = be32(b, 16);
            // A chunk carries at most the data of one request plus its own header.
            if len > MAX_REQUEST_LEN + 8 + MAX_STRING_LEN as u32 {
                return Err(ParseError::OptionTooLong(len));
            }
            Ok(ReplyHeader::Structured {
                flags: be16(b, 4),
                chunk_type: be16(b, 6),
                cookie: be64(b, 8),
                len,
            })
        }
        other => Err(ParseError::BadMagic {
            expected: u64::from(SIMPLE_REPLY_MAGIC),
            found: u64::from(other),
        }),
    }
}

/// Parses the payload of an error chunk: the error value and its message.
pub fn parse_structured_error(payload: &[u8]) -> Result<(u32, String), ParseError> {
    need(payload, 6)?;
    let error = be32(payload, 0);
    let len = be16(payload, 4) as usize;
    let available = payload.len() - 6;
    if len > available {
        return Err(ParseError::Truncated {
            what: "error message",
            len,
            available,
        });
    }
    let message = String::from_utf8_lossy(&payload[6..6 + len]).into_owned();
    Ok((error, message))
}

/// The NBD error value for an I/O error of the device.
pub fn error_value(e: &std::io::Error) -> u32 {
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::EACCES) => return EPERM,
        Some(libc::ENOMEM) => return ENOMEM,
        Some(libc::EINVAL) => return EINVAL,
        Some(libc::ENOSPC) => return ENOSPC,
        Some(libc::EOVERFLOW) => return EOVERFLOW,
        Some(libc::EOPNOTSUPP) => return ENOTSUP,
        Some(_) => return EIO,
        None => {}
    }
    match e.kind() {
        std::io::ErrorKind::PermissionDenied | std::io::ErrorKind::ReadOnlyFilesystem => EPERM,
        std::io::ErrorKind::InvalidInput => EINVAL,
        std::io::ErrorKind::OutOfMemory => ENOMEM,
        std::io::ErrorKind::StorageFull => ENOSPC,
        std::io::ErrorKind::Unsupported => ENOTSUP,
        _ => EIO,
    }
}

/// The name of a command, for messages.
pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "read",
        CMD_WRITE => "write",
        CMD_DISC => "disconnect",
        CMD_FLUSH => "flush",
        CMD_TRIM => "trim",
        CMD_CACHE => "cache",
        CMD_WRITE_ZEROES => "write-zeroes",
        CMD_BLOCK_STATUS => "block-status",
        CMD_RESIZE => "resize",
        _ => "unknown command",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request_bytes(magic: u32, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&magic.to_be_bytes());
        v.extend_from_slice(&flags.to_be_bytes());
        v.extend_from_slice(&cmd.to_be_bytes());
        v.extend_from_slice(&cookie.to_be_bytes());
        v.extend_from_slice(&offset.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    #[test]
    fn requests_parse_or_fail_as_tabled() {
        let ok = |flags, command, cookie, offset, len| {
            Ok(Request {
                flags,
                command,
                cookie,
                offset,
                len,
            })
        };
        let table: Vec<(&str, Vec<u8>, Result<Request, ParseError>)> = vec![
            (
                "read",
                request_bytes(REQUEST_MAGIC, 0, CMD_READ, 7, 4096, 512),
                ok(0, CMD_READ, 7, 4096, 512),
            ),
            (
                "write with FUA",
                request_bytes(REQUEST_MAGIC, CMD_FLAG_FUA, CMD_WRITE, u64::MAX, 0, 1),
                ok(CMD_FLAG_FUA, CMD_WRITE, u64::MAX, 0, 1),
            ),
            (
                "unknown command still parses (the server answers EINVAL)",
                request_bytes(REQUEST_MAGIC, 0, 0xffff, 1, u64::MAX, u32::MAX),
                ok(0, 0xffff, 1, u64::MAX, u32::MAX),
            ),
            (
                "simple reply magic is not a request",
                request_bytes(SIMPLE_REPLY_MAGIC, 0, 0, 0, 0, 0),
                Err(ParseError::BadMagic {
                    expected: REQUEST_MAGIC as u64,
                    found: SIMPLE_REPLY_MAGIC as u64,
                }),
            ),
            ("empty", vec![], Err(ParseError::Short { needed: 28, got: 0 })),
            (
                "27 bytes",
                vec![0x25; 27],
                Err(ParseError::Short { needed: 28, got: 27 }),
            ),
        ];
        for (what, bytes, want) in table {
            assert_eq!(parse_request(&bytes), want, "{what}");
        }
    }

    #[test]
    fn requests_round_trip() {
        let r = Request {
            flags: 3,
            command: CMD_WRITE_ZEROES,
            cookie: 0x0102030405060708,
            offset: 1 << 40,
            len: 99,
        };
        assert_eq!(parse_request(&encode_request(&r)), Ok(r));
    }

    fn option_bytes(magic: u64, option: u32, len: u32) -> Vec<u8> {
        let mut v = magic.to_be_bytes().to_vec();
        v.extend_from_slice(&option.to_be_bytes());
        v.extend_from_slice(&len.to_be_bytes());
        v
    }

    #[test]
    fn option_headers_parse_or_fail_as_tabled() {
        let table: Vec<(&str, Vec<u8>, Result<OptionHeader, ParseError>)> = vec![
            (
                "go",
                option_bytes(IHAVEOPT, OPT_GO, 10),
                Ok(OptionHeader {
                    option: OPT_GO,
                    len: 10,
                }),
            ),
            (
                "at the limit",
                option_bytes(IHAVEOPT, 99, MAX_OPTION_LEN),
                Ok(OptionHeader {
                    option: 99,
                    len: MAX_OPTION_LEN,
                }),
            ),
            (
                "oversized",
                option_bytes(IHAVEOPT, OPT_GO, u32::MAX),
                Err(ParseError::OptionTooLong(u32::MAX)),
            ),
            (
                "oversized by one",
                option_bytes(IHAVEOPT, 1, MAX_OPTION_LEN + 1),
                Err(ParseError::OptionTooLong(MAX_OPTION_LEN + 1)),
            ),
            (
                "bad magic",
                option_bytes(NBD_MAGIC, OPT_GO, 0),
                Err(ParseError::BadMagic {
                    expected: IHAVEOPT,
                    found: NBD_MAGIC,
                }),
            ),
            ("short", vec![0x49; 15], Err(ParseError::Short { needed: 16, got: 15 })),
        ];
        for (what, bytes, want) in table {
            assert_eq!(parse_option_header(&bytes), want, "{what}");
        }
    }

    #[test]
    fn info_requests_parse_or_fail_as_tabled() {
        let mut two = encode_info_request("disk", &[INFO_BLOCK_SIZE, INFO_NAME]);
        let table: Vec<(&str, Vec<u8>, Result<InfoRequest<'_>, ParseError>)> = vec![
            (
                "name and two requests",
                two.clone(),
                Ok(InfoRequest {
                    name: "disk",
                    requests: vec![3, 1],
                }),
            ),
            (
                "empty name",
                encode_info_request("", &[]),
                Ok(InfoRequest {
                    name: "",
                    requests: vec![],
                }),
            ),
            ("empty payload", vec![], Err(ParseError::Short { needed: 4, got: 0 })),
            (
                "name length past the end",
                vec![0, 0, 0, 9, b'a', 0, 0],
                Err(ParseError::Truncated {
                    what: "export name",
                    len: 9,
                    available: 3,
                }),
            ),
            (
                "name length u32::MAX",
                vec![0xff, 0xff, 0xff, 0xff, 0, 0],
                Err(ParseError::Truncated {
                    what: "export name",
                    len: u32::MAX as usize,
                    available: 2,
                }),
            ),
            (
                "empty name and no request count",
                vec![0, 0, 0, 0],
                Err(ParseError::Truncated {
                    what: "export name",
                    len: 0,
                    available: 0,
                }),
            ),
            (
                "no request count",
                vec![0, 0, 0, 1, b'a'],
                Err(ParseError::Truncated {
                    what: "export name",
                    len: 1,
                    available: 1,
                }),
            ),
            (
                "count larger than the list",
                vec![0, 0, 0, 0, 0, 2, 0, 1],
                Err(ParseError::Truncated {
                    what: "information request list",
                    len: 4,
                    available: 2,
                }),
            ),
            (
                "trailing byte",
                vec![0, 0, 0, 0, 0, 0, 7],
                Err(ParseError::Trailing("the information request list")),
            ),
            (
                "NUL in name",
                encode_info_request("a\0b", &[]),
                Err(ParseError::BadString("export name")),
            ),
            (
                "invalid UTF-8",
                vec![0, 0, 0, 1, 0xff, 0, 0],
                Err(ParseError::BadString("export name")),
            ),
        ];
        for (what, bytes, want) in table {
            assert_eq!(parse_info_request(&bytes), want, "{what}");
        }
        two.push(0);
        assert!(parse_info_request(&two).is_err());
    }

    #[test]
    fn export_names_longer_than_the_protocol_allows_are_refused() {
        let long = vec![b'x'; MAX_STRING_LEN + 1];
        assert_eq!(parse_export_name(&long), Err(ParseError::StringTooLong("export name")));
        assert_eq!(
            parse_export_name(&long[..MAX_STRING_LEN]).map(str::len),
            Ok(MAX_STRING_LEN)
        );
    }

    #[test]
    fn info_replies_round_trip() {
        assert_eq!(
            parse_info_reply(&encode_info_export(1 << 30, 0x1ed)),
            Ok(Info::Export {
                size: 1 << 30,
                flags: 0x1ed
            })
        );
        assert_eq!(
            parse_info_reply(&encode_info_block_size(1, 4096, MAX_REQUEST_LEN)),
            Ok(Info::BlockSize {
                minimum: 1,
                preferred: 4096,
                maximum: MAX_REQUEST_LEN
            })
        );
        assert_eq!(
            parse_info_reply(&encode_info_string(INFO_NAME, "d")),
            Ok(Info::Name("d".into()))
        );
        assert_eq!(parse_info_reply(&[0, 9, 1]), Ok(Info::Unknown(9)));
        assert_eq!(
            parse_info_reply(&[0, 0, 1]),
            Err(ParseError::Short { needed: 10, got: 1 })
        );
        assert_eq!(
            parse_info_reply(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 9]),
            Err(ParseError::Trailing("NBD_INFO_EXPORT"))
        );
        assert_eq!(
            parse_rep_server(&encode_rep_server("a", "desc")),
            Ok(("a".into(), "desc".into()))
        );
        assert!(parse_rep_server(&[0, 0, 1, 0]).is_err());
    }

    #[test]
    fn reply_headers_parse_or_fail_as_tabled() {
        let simple = encode_simple_reply(EPERM, 42);
        assert_eq!(
            parse_reply_header(&simple),
            Ok(ReplyHeader::Simple {
                error: EPERM,
                cookie: 42
            })
        );
        let data = encode_read_data_header(5, 4096, 512);
        assert_eq!(
            parse_reply_header(&data),
            Ok(ReplyHeader::Structured {
                flags: REPLY_FLAG_DONE,
                chunk_type: REPLY_TYPE_OFFSET_DATA,
                cookie: 5,
                len: 520
            })
        );
        assert_eq!(
            parse_reply_header(&simple[..4]),
            Err(ParseError::Short { needed: 16, got: 4 })
        );
        assert_eq!(
            parse_reply_header(&data[..16]),
            Err(ParseError::Short { needed: 20, got: 16 })
        );
        assert!(matches!(
            parse_reply_header(&[0, 0, 0, 0]),
            Err(ParseError::BadMagic { .. })
        ));
        let huge = encode_structured_header(0, REPLY_TYPE_OFFSET_DATA, 1, u32::MAX);
        assert!(matches!(parse_reply_header(&huge), Err(ParseError::OptionTooLong(_))));
        let mut err = Vec::new();
        encode_structured_error(&mut err, 9, EINVAL, "out of range");
        assert_eq!(
            parse_structured_error(&err[STRUCTURED_HEADER_LEN..]),
            Ok((EINVAL, "out of range".into()))
        );
        assert!(parse_structured_error(&[0, 0, 0, 22, 0, 5, b'a']).is_err());
    }

    #[test]
    fn greeting_round_trips_and_rejects_oldstyle() {
        assert_eq!(parse_greeting(&encode_greeting(3)), Ok(3));
        let mut old = encode_greeting(0);
        old[8..16].copy_from_slice(&0x0000_4202_8186_1253_u64.to_be_bytes());
        assert!(matches!(parse_greeting(&old), Err(ParseError::BadMagic { .. })));
    }

    #[test]
    fn io_errors_map_to_protocol_values() {
        use std::io::{Error, ErrorKind};
        assert_eq!(error_value(&Error::from_raw_os_error(libc::EROFS)), EPERM);
        assert_eq!(error_value(&Error::from_raw_os_error(libc::ENOSPC)), ENOSPC);
        assert_eq!(error_value(&Error::from_raw_os_error(libc::EBADF)), EIO);
        assert_eq!(error_value(&Error::new(ErrorKind::PermissionDenied, "ro")), EPERM);
        assert_eq!(error_value(&Error::new(ErrorKind::InvalidInput, "range")), EINVAL);
        assert_eq!(error_value(&Error::other("x")), EIO);
    }
}
