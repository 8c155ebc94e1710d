//! Class names: ImageNet's (for the built-in classifier) and those a model
//! file's metadata carries (Ultralytics' `names`).

/// ImageNet-1k class names, in index order (torchvision's list; see models/NOTICE).
pub const IMAGENET_LABELS: &str = include_str!("../../../models/imagenet-labels.txt");

/// Class names from an Ultralytics `names` metadata value, e.g.
/// `{0: 'person', 1: 'bicycle'}`, in index order.
pub fn parse_names(text: &str) -> Option<Vec<String>> {
    let body = text.trim().strip_prefix('{')?.strip_suffix('}')?;
    let mut names: Vec<(usize, String)> = Vec::new();
    let mut rest = body;
    while !rest.trim().is_empty() {
        let (key, after) = rest.split_once(':')?;
        let idx: usize = key.trim().trim_start_matches(',').trim().parse().ok()?;
        let after = after.trim_start();
        let quote = after.chars().next().filter(|c| *c == '\'' || *c == '"')?;
        let end = after[1..].find(quote)? + 1;
        names.push((idx, after[1..end].to_owned()));
        rest = after[end + 1..].trim_start().trim_start_matches(',');
    }
    names.sort_by_key(|(i, _)| *i);
    names
        .iter()
        .enumerate()
        .all(|(i, (k, _))| i == *k)
        .then(|| names.into_iter().map(|(_, n)| n).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ultralytics_names() {
        assert_eq!(
            parse_names("{0: 'person', 1: \"traffic light\", 2: 'it''s'}").map(|v| v.len()),
            None,
            "malformed quoting is refused"
        );
        assert_eq!(parse_names("{1: 'b', 0: 'a'}").unwrap(), ["a", "b"]);
        assert_eq!(
            parse_names("{0: 'person', 1: 'traffic light'}").unwrap(),
            ["person", "traffic light"]
        );
        assert!(parse_names("{0: 'a', 2: 'c'}").is_none(), "gaps are refused");
    }
}
