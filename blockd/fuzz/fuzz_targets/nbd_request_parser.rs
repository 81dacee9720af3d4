//! The pure parsers of the NBD wire format on arbitrary bytes: no panic, and what
//! parses re-encodes to the same bytes.
#![no_main]

use blockd::nbd::proto::*;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = parse_request(data) {
        assert_eq!(&encode_request(&r)[..], &data[..REQUEST_LEN]);
    }
    if let Ok(h) = parse_option_header(data) {
        assert!(h.len <= MAX_OPTION_LEN);
    }
    if let Ok(req) = parse_info_request(data) {
        assert_eq!(encode_info_request(req.name, &req.requests), data);
    }
    let _ = parse_export_name(data);
    let _ = parse_option_reply_header(data);
    let _ = parse_info_reply(data);
    let _ = parse_rep_server(data);
    let _ = parse_reply_header(data);
    let _ = parse_structured_error(data);
    let _ = parse_greeting(data);
});
