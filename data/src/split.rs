//! How an assignment's counts become its cases: the training subset is the front of the frozen
//! order, the held-out set its end. The coordinator (checking a submit) and the workers (taking
//! an assignment) slice the same way because both call this.

/// The cases one run trains and evaluates on.
#[derive(Debug, Clone, PartialEq)]
pub struct RunCases {
    pub train: Vec<String>,
    pub eval: Vec<String>,
}

/// Training cases from the front of the frozen order, held-out ones from its end.
pub fn slice_cases(cases: &[String], train: u32, eval: u32) -> Result<RunCases, String> {
    let (train, eval) = (train as usize, eval as usize);
    if train == 0 || train + eval > cases.len() {
        return Err(format!(
            "asks for {train} training and {eval} held-out cases of {}",
            cases.len()
        ));
    }
    Ok(RunCases {
        train: cases[..train].to_vec(),
        eval: cases[cases.len() - eval..].to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::slice_cases;

    #[test]
    fn training_is_a_prefix_and_held_out_cases_come_from_the_end() {
        let cases: Vec<String> = (0..10).map(|i| format!("c{i}")).collect();
        let small = slice_cases(&cases, 3, 2).unwrap();
        let large = slice_cases(&cases, 8, 2).unwrap();
        assert_eq!(small.train, ["c0", "c1", "c2"]);
        assert_eq!(large.train[..3], small.train[..]);
        assert_eq!(small.eval, ["c8", "c9"]);
        assert_eq!(small.eval, large.eval);
        assert!(slice_cases(&cases, 9, 2).is_err());
        assert!(slice_cases(&cases, 0, 2).is_err());
    }
}
