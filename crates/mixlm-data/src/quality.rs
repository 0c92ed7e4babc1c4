//! Model-free document quality on a 0..10 scale: the share of Gopher (Rae et al.
//! 2021, appendix A) and C4 (Raffel et al. 2020) quality rules a text passes, times 10.
//!
//! This is SampleMix's cheapest quality scorer, for corpora without LLM-annotated
//! scores and runs without a reference model. The rules were written for web prose:
//! code, tables and math pass fewer of them (few stop words, lines without terminal
//! punctuation), so on code-heavy domains prefer a reference model's perplexity.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Gopher's stop words: a text with fewer than two of them is rarely prose.
const STOP_WORDS: [&str; 8] = ["the", "be", "to", "of", "and", "that", "have", "with"];
const BULLETS: [char; 5] = ['•', '-', '*', '·', '‣'];

/// The measurements behind the score, each with the threshold in its doc.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QualitySignals {
    /// Gopher: 50..=100,000 words.
    pub words: usize,
    /// Gopher: 3..=10 characters.
    pub mean_word_length: f64,
    /// Gopher: `#` and ellipses per word, at most 0.1.
    pub symbol_ratio: f64,
    /// Gopher: lines starting with a bullet, at most 0.9.
    pub bullet_lines: f64,
    /// Gopher: lines ending with an ellipsis, at most 0.3.
    pub ellipsis_lines: f64,
    /// Gopher: words with an alphabetic character, at least 0.8.
    pub alpha_words: f64,
    /// Gopher: distinct stop words present, at least 2.
    pub stop_words: usize,
    /// Gopher repetition: characters in duplicated lines, at most 0.2.
    pub duplicate_line_chars: f64,
    /// Gopher repetition: characters in the most frequent word bigram, at most 0.2.
    pub top_bigram_chars: f64,
    /// Gopher repetition: characters in duplicated word 5-grams, at most 0.15.
    pub duplicate_5gram_chars: f64,
    /// C4: non-empty lines ending in terminal punctuation, at least 0.5.
    pub terminal_lines: f64,
    /// C4: the text contains "lorem ipsum".
    pub lorem_ipsum: bool,
}

impl QualitySignals {
    pub fn measure(text: &str) -> Self {
        let words: Vec<&str> = text.split_whitespace().collect();
        let n_words = words.len().max(1) as f64;
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .collect();
        let n_lines = lines.len().max(1) as f64;
        let chars = words
            .iter()
            .map(|w| w.chars().count())
            .sum::<usize>()
            .max(1) as f64;
        let lower: Vec<String> = words.iter().map(|w| w.to_lowercase()).collect();
        let stripped: Vec<&str> = lower
            .iter()
            .map(|w| w.trim_matches(|c: char| !c.is_alphanumeric()))
            .collect();

        let symbols =
            text.matches('#').count() + text.matches("...").count() + text.matches('…').count();
        let mut line_counts: HashMap<&str, usize> = HashMap::new();
        for l in &lines {
            *line_counts.entry(l).or_default() += 1;
        }
        let line_chars = lines
            .iter()
            .map(|l| l.chars().count())
            .sum::<usize>()
            .max(1) as f64;
        let duplicate_line_chars = line_counts
            .iter()
            .filter(|(_, &c)| c > 1)
            .map(|(l, &c)| (l.chars().count() * c) as f64)
            .sum::<f64>()
            / line_chars;

        let ngram_chars = |g: &[String]| g.iter().map(|w| w.chars().count()).sum::<usize>();
        let mut bigrams: HashMap<&[String], usize> = HashMap::new();
        for g in lower.windows(2) {
            *bigrams.entry(g).or_default() += 1;
        }
        let top_bigram_chars = bigrams
            .iter()
            .filter(|(_, &c)| c > 1)
            .map(|(g, &c)| (ngram_chars(g) * c) as f64)
            .fold(0.0, f64::max)
            / chars;
        // Characters of words covered by some 5-gram that occurs more than once.
        let mut fivegrams: HashMap<&[String], usize> = HashMap::new();
        for g in lower.windows(5) {
            *fivegrams.entry(g).or_default() += 1;
        }
        let mut covered = vec![false; lower.len()];
        for (i, g) in lower.windows(5).enumerate() {
            if fivegrams[g] > 1 {
                covered[i..i + 5].iter_mut().for_each(|c| *c = true);
            }
        }
        let duplicate_5gram_chars = covered
            .iter()
            .zip(&lower)
            .filter(|(c, _)| **c)
            .map(|(_, w)| w.chars().count())
            .sum::<usize>() as f64
            / chars;

        Self {
            words: words.len(),
            mean_word_length: chars / n_words,
            symbol_ratio: symbols as f64 / n_words,
            bullet_lines: lines.iter().filter(|l| l.starts_with(BULLETS)).count() as f64 / n_lines,
            ellipsis_lines: lines
                .iter()
                .filter(|l| l.ends_with("...") || l.ends_with('…'))
                .count() as f64
                / n_lines,
            alpha_words: words
                .iter()
                .filter(|w| w.chars().any(char::is_alphabetic))
                .count() as f64
                / n_words,
            stop_words: STOP_WORDS.iter().filter(|s| stripped.contains(s)).count(),
            duplicate_line_chars,
            top_bigram_chars,
            duplicate_5gram_chars,
            terminal_lines: lines
                .iter()
                .filter(|l| l.ends_with(['.', '!', '?', '"', '\'', '”']))
                .count() as f64
                / n_lines,
            lorem_ipsum: text.to_lowercase().contains("lorem ipsum"),
        }
    }

    /// Which rules pass, by name, in a fixed order.
    pub fn checks(&self) -> [(&'static str, bool); 12] {
        [
            ("word_count", (50..=100_000).contains(&self.words)),
            (
                "mean_word_length",
                (3.0..=10.0).contains(&self.mean_word_length),
            ),
            ("symbol_ratio", self.symbol_ratio <= 0.1),
            ("bullet_lines", self.bullet_lines <= 0.9),
            ("ellipsis_lines", self.ellipsis_lines <= 0.3),
            ("alpha_words", self.alpha_words >= 0.8),
            ("stop_words", self.stop_words >= 2),
            ("duplicate_lines", self.duplicate_line_chars <= 0.2),
            ("top_bigram", self.top_bigram_chars <= 0.2),
            ("duplicate_5grams", self.duplicate_5gram_chars <= 0.15),
            ("terminal_punctuation", self.terminal_lines >= 0.5),
            ("no_lorem_ipsum", !self.lorem_ipsum),
        ]
    }

    /// `10 * passed / rules`.
    pub fn score(&self) -> f64 {
        let checks = self.checks();
        10.0 * checks.iter().filter(|c| c.1).count() as f64 / checks.len() as f64
    }
}

/// The heuristic quality of `text` on 0..10.
pub fn heuristic_quality(text: &str) -> f64 {
    QualitySignals::measure(text).score()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROSE: &str = "The river runs through the old town, and the people who live there \
        have known it all their lives. In spring the water rises with the melting snow; \
        in late summer it is low enough to cross on foot. Children learn to swim in its \
        shallow bends, and fishermen wait on the stone bridge at dawn.\n\
        Travellers who come for the market often stay a second day to walk along the \
        banks. The town council has kept the path open for more than a century, and \
        volunteers repair the fences each autumn before the first storms arrive.";

    #[test]
    fn clean_prose_passes_every_rule() {
        let s = QualitySignals::measure(PROSE);
        let failed: Vec<_> = s.checks().iter().filter(|c| !c.1).map(|c| c.0).collect();
        assert!(failed.is_empty(), "{failed:?} {s:?}");
        assert_eq!(heuristic_quality(PROSE), 10.0);
        // the, to, and, have, with.
        assert_eq!(s.stop_words, 5, "{s:?}");
    }

    #[test]
    fn each_defect_costs_its_rule() {
        let failed = |t: &str| -> Vec<&'static str> {
            QualitySignals::measure(t)
                .checks()
                .iter()
                .filter(|c| !c.1)
                .map(|c| c.0)
                .collect()
        };
        // Too short (and so a single line without enough words).
        assert_eq!(failed("The river and the town."), ["word_count"]);
        // Repeated lines: line and 5-gram duplication.
        let repeated = format!(
            "{PROSE}\n{}",
            "Buy cheap watches today, best price online for you.\n".repeat(30)
        );
        let f = failed(&repeated);
        assert!(
            f.contains(&"duplicate_lines") && f.contains(&"duplicate_5grams"),
            "{f:?}"
        );
        // Hashtags: symbol ratio.
        let tags = format!("{PROSE} {}", "#sale #deal ".repeat(20));
        assert!(failed(&tags).contains(&"symbol_ratio"));
        // Lorem ipsum.
        assert_eq!(
            failed(&format!("{PROSE} Lorem ipsum dolor sit amet.")),
            ["no_lorem_ipsum"]
        );
        // Numbers only: no alphabetic words, no stop words.
        let numbers = (0..200)
            .map(|i| (i * 7919 % 1000).to_string())
            .collect::<Vec<_>>()
            .join(" ");
        let f = failed(&numbers);
        assert!(
            f.contains(&"alpha_words") && f.contains(&"stop_words"),
            "{f:?}"
        );
        // A bullet list without terminal punctuation.
        let list: String = (0..60)
            .map(|i| format!("- item number {i} of the list with some words\n"))
            .collect();
        let f = failed(&list);
        assert!(
            f.contains(&"bullet_lines") && f.contains(&"terminal_punctuation"),
            "{f:?}"
        );
        assert!(heuristic_quality(&list) < heuristic_quality(PROSE));
    }

    #[test]
    fn signals_match_hand_counts() {
        let s = QualitySignals::measure("a bb ccc\na bb ccc\n#x dddd...");
        assert_eq!(s.words, 8);
        // Characters: 1+2+3 twice + 2 + 7 = 21 over 8 words.
        assert!((s.mean_word_length - 21.0 / 8.0).abs() < 1e-12);
        assert!((s.symbol_ratio - 2.0 / 8.0).abs() < 1e-12);
        // Lines "a bb ccc" (8 chars) twice of 8 + 8 + 10 characters.
        assert!((s.duplicate_line_chars - 16.0 / 26.0).abs() < 1e-12);
        assert!((s.ellipsis_lines - 1.0 / 3.0).abs() < 1e-12);
        // Bigram "a bb" (3 chars) occurs twice; "bb ccc" (5 chars) twice: top is 10/21.
        assert!((s.top_bigram_chars - 10.0 / 21.0).abs() < 1e-12);
    }
}
