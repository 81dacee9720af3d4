//! Route templates a daemon's router and its client share, so the two cannot drift:
//! each daemon names its routes once (`routes` in its http module), registers the
//! templates with axum and fills them here for its client.

/// `template` with its `{placeholders}` replaced by `values`, in order.
///
/// # Panics
/// When the number of values differs from the number of placeholders: a caller's bug
/// that every test of the route finds.
pub fn fill(template: &str, values: &[&str]) -> String {
    let mut out = String::with_capacity(template.len() + values.iter().map(|v| v.len()).sum::<usize>());
    let mut rest = template;
    let mut values = values.iter();
    while let Some(open) = rest.find('{') {
        out.push_str(&rest[..open]);
        let close = rest[open..].find('}').map_or(rest.len(), |c| open + c);
        match values.next() {
            Some(v) => out.push_str(v),
            None => panic!("route {template}: too few values"),
        }
        rest = rest.get(close + 1..).unwrap_or_default();
    }
    out.push_str(rest);
    assert!(values.next().is_none(), "route {template}: too many values");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_filled_in_order() {
        assert_eq!(fill("/vms", &[]), "/vms");
        assert_eq!(fill("/vms/{id}", &["a"]), "/vms/a");
        assert_eq!(
            fill("/vms/{id}/disks/{disk}/resize", &["a", "d1"]),
            "/vms/a/disks/d1/resize"
        );
        assert!(std::panic::catch_unwind(|| fill("/vms/{id}", &[])).is_err());
        assert!(std::panic::catch_unwind(|| fill("/vms", &["x"])).is_err());
    }
}
