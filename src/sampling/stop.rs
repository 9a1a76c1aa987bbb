//! Stop strings, matched in the decoded text across token boundaries. Text that could still
//! turn out to be the start of a stop string is held back until it cannot; the stop string
//! itself is never emitted.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// Text that is safe to show now.
    pub emit: String,
    /// The stop string that matched; generation ends.
    pub stopped: Option<String>,
}

#[derive(Debug, Clone, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    /// Empty stop strings are ignored.
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            held: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> Pushed {
        self.held.push_str(text);
        // earliest match wins; on equal starts, the longest stop string
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()).map(|i| (i, s)))
            .min_by(|a, b| a.0.cmp(&b.0).then(b.1.len().cmp(&a.1.len())));
        if let Some((i, s)) = hit {
            let emit = self.held[..i].to_string();
            let stopped = Some(s.clone());
            self.held.clear();
            return Pushed { emit, stopped };
        }
        // hold back the longest suffix that is a proper prefix of some stop string
        let keep_from = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let emit = self.held[..keep_from].to_string();
        self.held.drain(..keep_from);
        Pushed {
            emit,
            stopped: None,
        }
    }

    /// The end of generation without a stop string: whatever was held back is real text.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, Option<String>) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopMatcher::new(&stops);
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out += &r.emit;
            if r.stopped.is_some() {
                return (out, r.stopped);
            }
        }
        out += &m.finish();
        (out, None)
    }

    #[test]
    fn across_boundaries() {
        assert_eq!(
            run(&["END"], &["abc E", "N", "D more"]),
            ("abc ".into(), Some("END".into()))
        );
        assert_eq!(
            run(&["END"], &["abc E", "N", "d"]),
            ("abc ENd".into(), None)
        );
        assert_eq!(
            run(&["\n\n"], &["a\n", "\nb"]),
            ("a".into(), Some("\n\n".into()))
        );
        assert_eq!(
            run(&["東京"], &["首都は東", "京です"]),
            ("首都は".into(), Some("東京".into()))
        );
        assert_eq!(run(&[], &["x"]), ("x".into(), None));
    }

    #[test]
    fn held_text_is_released_when_it_cannot_match() {
        let mut m = StopMatcher::new(&["abc".to_string()]);
        assert_eq!(m.push("xa").emit, "x");
        assert_eq!(m.push("b").emit, "");
        assert_eq!(m.push("x").emit, "abx");
    }
}
