//! How an assignment's counts become its cases: the training subset is the front of the frozen
//! order, the held-out set its end. The coordinator (checking a submit) and the workers (taking
//! an assignment) slice the same way because both call this. Also the case-id list files
//! (SuPreM's `dataset_list/*.txt`) that name a subset of a dataset.

use std::collections::HashSet;

use crate::validate_case_id;

/// The cases one run trains and evaluates on.
#[derive(Debug, Clone, PartialEq)]
pub struct RunCases {
    pub train: Vec<String>,
    pub eval: Vec<String>,
}

/// Splits a frozen order, leaving out `quarantined` cases:
///
/// - held-out cases are the last `eval` positions of the order, minus the quarantined ones.
///   They are NOT replaced: the held-out set never borrows from the training region, so every
///   run over the order (and every subset size) is evaluated on the same cases;
/// - training cases are the first `train` cases of the rest (positions before the held-out
///   ones) that are not quarantined. A quarantined case IS replaced by the next good case in the
///   order, so a run keeps the count it asked for, and the training sets of two sizes still nest
///   (both are prefixes of the same filtered order).
///
/// Fails when the region before the held-out set has fewer than `train` good cases.
pub fn slice_cases(cases: &[String], train: u32, eval: u32, quarantined: &[String]) -> Result<RunCases, String> {
    let (train, eval) = (train as usize, eval as usize);
    if train == 0 || train + eval > cases.len() {
        return Err(format!(
            "asks for {train} training and {eval} held-out cases of {}",
            cases.len()
        ));
    }
    let skip: HashSet<&str> = quarantined.iter().map(String::as_str).collect();
    let good = |c: &&String| !skip.contains(c.as_str());
    let region = &cases[..cases.len() - eval];
    let train_cases: Vec<String> = region.iter().filter(good).take(train).cloned().collect();
    if train_cases.len() < train {
        return Err(format!(
            "asks for {train} training cases but only {} of the {} before the held-out set are \
             not quarantined",
            train_cases.len(),
            region.len()
        ));
    }
    Ok(RunCases {
        train: train_cases,
        eval: cases[cases.len() - eval..].iter().filter(good).cloned().collect(),
    })
}

/// Parses a case-id list file: one id a line, surrounding whitespace trimmed, blank lines and
/// lines starting with `#` ignored (SuPreM's `dataset_list/*.txt` format). `file` names the file
/// in errors, which also give the 1-based line. A repeated id is an error too, since a list with
/// duplicates would otherwise train on fewer distinct cases than it has lines.
pub fn parse_case_list(text: &str, file: &str) -> Result<Vec<String>, String> {
    let mut ids = Vec::new();
    let mut seen = std::collections::HashMap::new();
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        let id = line.trim();
        if id.is_empty() || id.starts_with('#') {
            continue;
        }
        validate_case_id(id).map_err(|e| format!("{file}:{line_no}: {e}"))?;
        if let Some(first) = seen.insert(id.to_string(), line_no) {
            return Err(format!("{file}:{line_no}: case id `{id}` repeats line {first}"));
        }
        ids.push(id.to_string());
    }
    if ids.is_empty() {
        return Err(format!("{file}: lists no case ids"));
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("c{i}")).collect()
    }

    #[test]
    fn training_is_a_prefix_and_held_out_cases_come_from_the_end() {
        let cases = ids(10);
        let small = slice_cases(&cases, 3, 2, &[]).unwrap();
        let large = slice_cases(&cases, 8, 2, &[]).unwrap();
        assert_eq!(small.train, ["c0", "c1", "c2"]);
        assert_eq!(large.train[..3], small.train[..]);
        assert_eq!(small.eval, ["c8", "c9"]);
        assert_eq!(small.eval, large.eval);
        assert!(slice_cases(&cases, 9, 2, &[]).is_err());
        assert!(slice_cases(&cases, 0, 2, &[]).is_err());
    }

    #[test]
    fn quarantined_training_cases_are_replaced_by_the_next_good_ones() {
        let cases = ids(10);
        let bad = vec!["c1".to_string(), "c9".to_string(), "nowhere".to_string()];
        let small = slice_cases(&cases, 3, 2, &bad).unwrap();
        let large = slice_cases(&cases, 6, 2, &bad).unwrap();
        assert_eq!(small.train, ["c0", "c2", "c3"]);
        assert_eq!(large.train[..3], small.train[..], "subsets still nest");
        assert_eq!(large.train, ["c0", "c2", "c3", "c4", "c5", "c6"]);
        // Held-out cases are not replaced: the set stays the same positions, minus the bad one.
        assert_eq!(small.eval, ["c8"]);
        // 8 positions before the held-out set, one of them quarantined: 7 good.
        assert!(slice_cases(&cases, 7, 2, &bad).is_ok());
        let err = slice_cases(&cases, 8, 2, &bad).unwrap_err();
        assert!(err.contains("quarantined") && err.contains("7"), "{err}");
    }

    #[test]
    fn case_lists_skip_blanks_and_comments_and_name_file_and_line() {
        let text = "# SuPreM subset\nBDMAP_00000001\n\n  BDMAP_00000005  \n# done\n";
        assert_eq!(
            parse_case_list(text, "list.txt").unwrap(),
            ["BDMAP_00000001", "BDMAP_00000005"]
        );
        let err = parse_case_list("BDMAP_1\nbad id\n", "l.txt").unwrap_err();
        assert!(err.starts_with("l.txt:2:"), "{err}");
        let err = parse_case_list("a\n../etc\n", "l.txt").unwrap_err();
        assert!(err.starts_with("l.txt:2:"), "{err}");
        let err = parse_case_list("a\nb\na\n", "l.txt").unwrap_err();
        assert!(err.contains("l.txt:3") && err.contains("line 1"), "{err}");
        assert!(
            parse_case_list("# nothing\n\n", "e.txt")
                .unwrap_err()
                .contains("no case ids")
        );
    }
}
