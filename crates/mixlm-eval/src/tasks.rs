//! Downstream zero-shot scoring from local task files, by log-likelihood.
//!
//! A task file is jsonl; each line is recognised by its keys, so the files users have
//! on disk from the usual sources load as they are:
//!
//! | layout | keys |
//! |---|---|
//! | generic | `context` (or `query`, `question`, `ctx`), `choices` (or `endings`, `options`), `gold` (or `label`, `answer`: index or letter) |
//! | PIQA | `goal`, `sol1`, `sol2`, `label` |
//! | HellaSwag | `ctx` (or `ctx_a` + `ctx_b`), `endings`, `label` |
//! | ARC / OpenBookQA (HF) | `question` or `question_stem`, `choices: {text, label}`, `answerKey` |
//! | ARC / OpenBookQA (AI2) | `question: {stem, choices: [{text, label}]}`, `answerKey` |
//! | WinoGrande | `sentence` with `_`, `option1`, `option2`, `answer` (`"1"`/`"2"`) |
//! | LAMBADA | `text` alone: predict its last word |
//!
//! Multiple choice: each choice is scored as the sum of log-probabilities of its
//! tokens after the context (`" " + choice` unless it already starts with a space);
//! `acc` takes the best sum, `acc_norm` the best sum per byte of the choice (the
//! usual length normalisation). WinoGrande uses partial scoring: the option fills the
//! blank in the context and the shared rest of the sentence is the continuation.
//! LAMBADA: accuracy of greedy prediction of every token of the last word, and its
//! perplexity.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::model::LanguageModel;

/// One question: a context and its candidate continuations.
#[derive(Debug, Clone, PartialEq)]
pub struct Question {
    /// One context per choice (they differ only for WinoGrande's partial scoring).
    pub contexts: Vec<String>,
    pub continuations: Vec<String>,
    pub gold: usize,
}

/// A parsed task file.
#[derive(Debug, Clone, PartialEq)]
pub enum Task {
    MultipleChoice(Vec<Question>),
    /// LAMBADA: `(context, last word with its leading space)`.
    LastWord(Vec<(String, String)>),
}

/// Result of one task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskScore {
    pub task: String,
    pub examples: usize,
    /// Accuracy by total log-likelihood (LAMBADA: greedy last-word accuracy).
    pub acc: f64,
    /// Accuracy by log-likelihood per byte of the choice (multiple choice only).
    pub acc_norm: Option<f64>,
    /// Perplexity of the last word (LAMBADA only).
    pub ppl: Option<f64>,
}

/// Parses a task file (see the module docs); errors name the file and line.
pub fn load_task(path: &Path) -> Result<Task, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read task file {}: {e}", path.display()))?;
    let mut mc = Vec::new();
    let mut lw = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), i + 1);
        let v: Value =
            serde_json::from_str(line).map_err(|e| format!("{}: invalid JSON ({e})", at()))?;
        match parse_line(&v).map_err(|e| format!("{}: {e}", at()))? {
            Parsed::Question(q) => mc.push(q),
            Parsed::LastWord(c, w) => lw.push((c, w)),
        }
    }
    match (mc.is_empty(), lw.is_empty()) {
        (false, true) => Ok(Task::MultipleChoice(mc)),
        (true, false) => Ok(Task::LastWord(lw)),
        (true, true) => Err(format!("task file {} has no examples", path.display())),
        (false, false) => Err(format!(
            "task file {} mixes multiple-choice and LAMBADA lines",
            path.display()
        )),
    }
}

enum Parsed {
    Question(Question),
    LastWord(String, String),
}

fn str_of<'a>(v: &'a Value, keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| v.get(*k).and_then(Value::as_str))
}

/// The gold index from a number, a numeric string, or a letter matched to `labels`
/// (`A`, `B`, ... when none are given).
fn gold_index(v: &Value, labels: Option<&[String]>, n: usize) -> Result<usize, String> {
    let g = match v {
        Value::Number(x) => x.as_u64().ok_or("gold must be a non-negative integer")? as usize,
        Value::String(s) => match labels.and_then(|l| l.iter().position(|x| x == s)) {
            Some(i) => i,
            None => match s.parse::<usize>() {
                Ok(i) => i,
                Err(_) if s.len() == 1 && s.as_bytes()[0].is_ascii_uppercase() => {
                    (s.as_bytes()[0] - b'A') as usize
                }
                Err(_) => return Err(format!("cannot read the answer `{s}`")),
            },
        },
        _ => return Err("the answer must be an index or a label".into()),
    };
    if g >= n {
        return Err(format!("answer {g} is out of range for {n} choices"));
    }
    Ok(g)
}

/// `{text: [...], label: [...]}` or `[{text, label}, ...]` choices.
fn labelled_choices(v: &Value) -> Option<(Vec<String>, Vec<String>)> {
    let strings = |x: &Value| -> Option<Vec<String>> {
        x.as_array()?
            .iter()
            .map(|s| s.as_str().map(String::from))
            .collect()
    };
    if let (Some(t), Some(l)) = (v.get("text"), v.get("label")) {
        return Some((strings(t)?, strings(l)?));
    }
    let arr = v.as_array()?;
    let mut texts = Vec::new();
    let mut labels = Vec::new();
    for c in arr {
        texts.push(c.get("text")?.as_str()?.to_string());
        labels.push(c.get("label")?.as_str()?.to_string());
    }
    Some((texts, labels))
}

fn parse_line(v: &Value) -> Result<Parsed, String> {
    let question = |context: String, choices: Vec<String>, gold: usize| {
        Parsed::Question(Question {
            contexts: vec![context; choices.len()],
            continuations: choices,
            gold,
        })
    };
    // WinoGrande.
    if let (Some(s), Some(o1), Some(o2)) = (
        str_of(v, &["sentence"]),
        str_of(v, &["option1"]),
        str_of(v, &["option2"]),
    ) {
        let blank = s.find('_').ok_or("WinoGrande sentence has no `_`")?;
        let (before, after) = (&s[..blank], s[blank + 1..].trim_start());
        let gold = gold_index(v.get("answer").ok_or("missing `answer`")?, None, 3)?;
        if gold == 0 {
            return Err("WinoGrande answer must be 1 or 2".into());
        }
        return Ok(Parsed::Question(Question {
            contexts: vec![format!("{before}{o1}"), format!("{before}{o2}")],
            continuations: vec![after.to_string(), after.to_string()],
            gold: gold - 1,
        }));
    }
    // PIQA.
    if let (Some(goal), Some(s1), Some(s2)) = (
        str_of(v, &["goal"]),
        str_of(v, &["sol1"]),
        str_of(v, &["sol2"]),
    ) {
        let gold = gold_index(v.get("label").ok_or("missing `label`")?, None, 2)?;
        return Ok(question(
            format!("Question: {goal}\nAnswer:"),
            vec![s1.into(), s2.into()],
            gold,
        ));
    }
    // ARC / OpenBookQA, AI2 layout: question = {stem, choices}.
    if let Some(q) = v.get("question").filter(|q| q.is_object()) {
        let stem = str_of(q, &["stem"]).ok_or("missing `question.stem`")?;
        let (texts, labels) = q
            .get("choices")
            .and_then(labelled_choices)
            .ok_or("missing `question.choices`")?;
        let gold = gold_index(
            v.get("answerKey").ok_or("missing `answerKey`")?,
            Some(&labels),
            texts.len(),
        )?;
        return Ok(question(format!("Question: {stem}\nAnswer:"), texts, gold));
    }
    // ARC / OpenBookQA, HF layout: choices = {text, label}, answerKey.
    if let (Some(stem), Some(key)) = (
        str_of(v, &["question", "question_stem"]),
        v.get("answerKey"),
    ) {
        let (texts, labels) = v
            .get("choices")
            .and_then(labelled_choices)
            .ok_or("missing `choices` {text, label}")?;
        let gold = gold_index(key, Some(&labels), texts.len())?;
        return Ok(question(format!("Question: {stem}\nAnswer:"), texts, gold));
    }
    // Generic and HellaSwag.
    let choices = ["choices", "endings", "options"]
        .iter()
        .find_map(|k| v.get(*k).and_then(Value::as_array));
    if let Some(choices) = choices {
        let context = match (str_of(v, &["ctx_a"]), str_of(v, &["ctx_b"])) {
            (Some(a), Some(b)) if str_of(v, &["ctx"]).is_none() => format!("{a} {b}"),
            _ => str_of(v, &["context", "query", "question", "ctx"])
                .ok_or("missing the context (`context`, `query`, `question` or `ctx`)")?
                .to_string(),
        };
        let choices: Vec<String> = choices
            .iter()
            .map(|c| {
                c.as_str()
                    .map(String::from)
                    .ok_or("choices must be strings")
            })
            .collect::<Result<_, _>>()?;
        if choices.len() < 2 {
            return Err("a question needs at least 2 choices".into());
        }
        let gold = ["gold", "label", "answer"]
            .iter()
            .find_map(|k| v.get(*k))
            .ok_or("missing the answer (`gold`, `label` or `answer`)")?;
        let gold = gold_index(gold, None, choices.len())?;
        return Ok(question(context, choices, gold));
    }
    // LAMBADA.
    if let Some(text) = str_of(v, &["text"]) {
        let text = text.trim_end();
        let cut = text
            .rfind(' ')
            .ok_or("LAMBADA text has no space before its last word")?;
        return Ok(Parsed::LastWord(
            text[..cut].to_string(),
            text[cut..].to_string(),
        ));
    }
    Err(
        "unrecognised task line: expected one of the layouts in the docs (context/choices/gold, \
         PIQA, HellaSwag, ARC, OpenBookQA, WinoGrande, LAMBADA text)"
            .into(),
    )
}

/// What scoring needs from a model: for each sequence (at most `max_len + 1`
/// tokens), the log-probability of every token after the first and whether it was
/// the greedy choice.
pub trait TokenScorer {
    fn max_len(&self) -> usize;
    /// `seqs[i]` -> `(logp[t], greedy[t])` for `t` in `1..seqs[i].len()`.
    fn score(&mut self, seqs: &[Vec<u32>]) -> Vec<(Vec<f64>, Vec<bool>)>;
}

/// `(sum of log-probabilities, all greedy)` of `continuation` after `context`,
/// keeping the continuation and as much context as fits (left truncation).
fn continuation_scores(
    scorer: &mut dyn TokenScorer,
    pairs: &[(Vec<u32>, Vec<u32>)],
    batch: usize,
) -> Vec<(f64, bool)> {
    let max = scorer.max_len() + 1;
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in pairs.chunks(batch.max(1)) {
        let seqs: Vec<Vec<u32>> = chunk
            .iter()
            .map(|(c, x)| {
                let mut s: Vec<u32> = c.iter().chain(x).copied().collect();
                if s.len() > max {
                    s.drain(..s.len() - max);
                }
                s
            })
            .collect();
        for ((_, x), (logp, greedy)) in chunk.iter().zip(scorer.score(&seqs)) {
            let n = x.len().min(logp.len());
            let from = logp.len() - n;
            out.push((logp[from..].iter().sum(), greedy[from..].iter().all(|&g| g)));
        }
    }
    out
}

/// Scores a task with `encode` (text -> ids) and `scorer`.
pub fn score_task(
    name: &str,
    task: &Task,
    encode: &dyn Fn(&str) -> Result<Vec<u32>, String>,
    scorer: &mut dyn TokenScorer,
    batch: usize,
) -> Result<TaskScore, String> {
    let lead = |s: &str| {
        if s.starts_with(' ') || s.is_empty() {
            s.to_string()
        } else {
            format!(" {s}")
        }
    };
    match task {
        Task::MultipleChoice(questions) => {
            let mut pairs = Vec::new();
            let mut bytes = Vec::new();
            for q in questions {
                for (ctx, cont) in q.contexts.iter().zip(&q.continuations) {
                    let cont = lead(cont);
                    let c = encode(ctx)?;
                    let x = encode(&cont)?;
                    if x.is_empty() {
                        return Err(format!("{name}: an empty choice after `{ctx}`"));
                    }
                    bytes.push(cont.len() as f64);
                    pairs.push((c, x));
                }
            }
            let scores = continuation_scores(scorer, &pairs, batch);
            let (mut acc, mut acc_norm, mut k) = (0usize, 0usize, 0usize);
            let argmax = |v: &[f64]| {
                (0..v.len())
                    .max_by(|&a, &b| v[a].total_cmp(&v[b]).then(b.cmp(&a)))
                    .unwrap_or(0)
            };
            for q in questions {
                let n = q.continuations.len();
                let ll: Vec<f64> = scores[k..k + n].iter().map(|s| s.0).collect();
                let norm: Vec<f64> = ll
                    .iter()
                    .zip(&bytes[k..k + n])
                    .map(|(l, b)| l / b)
                    .collect();
                acc += usize::from(argmax(&ll) == q.gold);
                acc_norm += usize::from(argmax(&norm) == q.gold);
                k += n;
            }
            let n = questions.len().max(1) as f64;
            Ok(TaskScore {
                task: name.into(),
                examples: questions.len(),
                acc: acc as f64 / n,
                acc_norm: Some(acc_norm as f64 / n),
                ppl: None,
            })
        }
        Task::LastWord(items) => {
            let pairs = items
                .iter()
                .map(|(c, w)| Ok((encode(c)?, encode(w)?)))
                .collect::<Result<Vec<_>, String>>()?;
            let tokens: usize = pairs.iter().map(|p| p.1.len()).sum();
            let scores = continuation_scores(scorer, &pairs, batch);
            let correct = scores.iter().filter(|s| s.1).count();
            let nll: f64 = -scores.iter().map(|s| s.0).sum::<f64>();
            Ok(TaskScore {
                task: name.into(),
                examples: items.len(),
                acc: correct as f64 / items.len().max(1) as f64,
                acc_norm: None,
                ppl: Some((nll / tokens.max(1) as f64).exp()),
            })
        }
    }
}

/// A [`TokenScorer`] over a [`LanguageModel`] (right-padded batches, see
/// [`LanguageModel::score`]), with the model's context as its longest sequence.
pub struct ModelScorer<'a>(pub &'a dyn LanguageModel);

impl TokenScorer for ModelScorer<'_> {
    fn max_len(&self) -> usize {
        self.0.config().max_seq_len
    }

    fn score(&mut self, seqs: &[Vec<u32>]) -> Vec<(Vec<f64>, Vec<bool>)> {
        self.0.score(seqs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bytes as ids.
    fn encode(s: &str) -> Result<Vec<u32>, String> {
        Ok(s.bytes().map(u32::from).collect())
    }

    /// A "model" that likes the letters of "yes": log p = -0.1 for them, -3 for any
    /// other token, whatever the context; greedy exactly on those letters.
    struct Likes {
        max_len: usize,
        seen: Vec<usize>,
    }

    impl TokenScorer for Likes {
        fn max_len(&self) -> usize {
            self.max_len
        }
        fn score(&mut self, seqs: &[Vec<u32>]) -> Vec<(Vec<f64>, Vec<bool>)> {
            seqs.iter()
                .map(|s| {
                    self.seen.push(s.len());
                    let liked = |t: &u32| b"yes".contains(&(*t as u8));
                    (
                        s[1..]
                            .iter()
                            .map(|t| if liked(t) { -0.1 } else { -3.0 })
                            .collect(),
                        s[1..].iter().map(liked).collect(),
                    )
                })
                .collect()
        }
    }

    fn mc(lines: &[&str]) -> Task {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.jsonl");
        std::fs::write(&p, lines.join("\n")).unwrap();
        load_task(&p).unwrap()
    }

    #[test]
    fn picks_the_likelier_choice_and_normalises_by_bytes() {
        let task = mc(&[
            r#"{"context": "Q", "choices": ["no", "yes"], "gold": 1}"#,
            // " yes" = -3.3 in total beats " yesyesyes" = -3.9, but per byte
            // (-0.825 vs -0.39) the long one wins: acc and acc_norm disagree.
            r#"{"context": "Q", "choices": ["yes", "yesyesyes"], "gold": 1}"#,
        ]);
        let mut s = Likes {
            max_len: 64,
            seen: Vec::new(),
        };
        let r = score_task("t", &task, &encode, &mut s, 3).unwrap();
        assert_eq!(r.examples, 2);
        assert_eq!(r.acc, 0.5);
        assert_eq!(r.acc_norm, Some(1.0));
        // Context + " " + choice: "Q no" is 4 tokens.
        assert_eq!(s.seen[0], 4);
    }

    #[test]
    fn lambada_last_word_greedy_accuracy_and_perplexity() {
        let task = mc(&[
            r#"{"text": "they said yes"}"#,
            r#"{"text": "they said no"}"#,
        ]);
        let Task::LastWord(items) = &task else {
            panic!("{task:?}")
        };
        assert_eq!(items[0], ("they said".into(), " yes".into()));
        let mut s = Likes {
            max_len: 64,
            seen: Vec::new(),
        };
        let r = score_task("lambada", &task, &encode, &mut s, 8).unwrap();
        // " yes": the space is not greedy; no item is fully predicted.
        assert_eq!(r.acc, 0.0);
        // NLL: " yes" = 3.3, " no" = 9 over 7 tokens.
        assert!((r.ppl.unwrap() - (12.3f64 / 7.0).exp()).abs() < 1e-9);
        // A word made only of liked letters is predicted.
        let t = Task::LastWord(vec![("x".into(), "yes".into())]);
        assert_eq!(score_task("l", &t, &encode, &mut s, 1).unwrap().acc, 1.0);
    }

    #[test]
    fn long_contexts_are_truncated_from_the_left() {
        let long = "z".repeat(100);
        let task = Task::MultipleChoice(vec![Question {
            contexts: vec![long.clone(), long],
            continuations: vec!["no".into(), "yes".into()],
            gold: 1,
        }]);
        let mut s = Likes {
            max_len: 10,
            seen: Vec::new(),
        };
        let r = score_task("t", &task, &encode, &mut s, 2).unwrap();
        assert_eq!(r.acc, 1.0);
        assert!(s.seen.iter().all(|&n| n == 11), "{:?}", s.seen);
    }

    #[test]
    fn every_layout_parses_to_the_same_question_shape() {
        let q = |line: &str| match mc(&[line]) {
            Task::MultipleChoice(q) => q.into_iter().next().unwrap(),
            t => panic!("{t:?}"),
        };
        let piqa = q(r#"{"goal": "open a jar", "sol1": "twist", "sol2": "pull", "label": 1}"#);
        assert_eq!(piqa.contexts[0], "Question: open a jar\nAnswer:");
        assert_eq!((piqa.continuations.len(), piqa.gold), (2, 1));
        let hs = q(
            r#"{"ctx_a": "A man", "ctx_b": "sits", "endings": ["a", "b", "c", "d"], "label": "2"}"#,
        );
        assert_eq!((hs.contexts[0].as_str(), hs.gold), ("A man sits", 2));
        let arc = q(
            r#"{"question": "2+2?", "choices": {"text": ["3", "4"], "label": ["A", "B"]}, "answerKey": "B"}"#,
        );
        assert_eq!((arc.continuations[1].as_str(), arc.gold), ("4", 1));
        let ai2 = q(
            r#"{"question": {"stem": "Sky?", "choices": [{"text": "blue", "label": "1"}, {"text": "red", "label": "2"}]}, "answerKey": "1"}"#,
        );
        assert_eq!(
            (ai2.contexts[0].as_str(), ai2.gold),
            ("Question: Sky?\nAnswer:", 0)
        );
        let obqa = q(
            r#"{"question_stem": "Sun is", "choices": {"text": ["hot", "cold"], "label": ["A", "B"]}, "answerKey": "A"}"#,
        );
        assert_eq!(obqa.gold, 0);
        let wino = q(
            r#"{"sentence": "Tom gave Ann a gift because _ was kind.", "option1": "Tom", "option2": "Ann", "answer": "1"}"#,
        );
        assert_eq!(
            wino.contexts,
            [
                "Tom gave Ann a gift because Tom",
                "Tom gave Ann a gift because Ann"
            ]
        );
        assert_eq!(wino.continuations[0], "was kind.");
        assert_eq!(wino.gold, 0);
        let generic = q(r#"{"query": "x", "options": ["a", "b", "c"], "answer": "C"}"#);
        assert_eq!(generic.gold, 2);
    }

    #[test]
    fn bad_lines_name_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.jsonl");
        let check = |content: &str, want: &str| {
            std::fs::write(&p, content).unwrap();
            let e = load_task(&p).unwrap_err();
            assert!(e.contains("bad.jsonl") && e.contains(want), "{e}");
        };
        check(
            "{\"context\": \"q\", \"choices\": [\"a\", \"b\"], \"gold\": 1}\n{oops",
            "bad.jsonl:2: invalid JSON",
        );
        check(
            r#"{"context": "q", "choices": ["a", "b"], "gold": 5}"#,
            "answer 5 is out of range",
        );
        check(r#"{"foo": 1}"#, "unrecognised task line");
        check("\n\n", "has no examples");
    }

    /// The Burn scorer agrees with the model's own per-token losses, and right
    /// padding in a batch with a longer sequence changes nothing.
    #[test]
    fn model_scorer_matches_token_losses_and_ignores_padding() {
        use burn::backend::NdArray;
        type B = NdArray<f32>;
        let device = Default::default();
        let mut config = mixlm_model::ModelConfig::preset("tiny").unwrap();
        config.vocab_size = 64;
        let model = crate::model::BurnModel::<B> {
            model: config.init::<B>(&device),
            config,
            device,
        };
        let mut scorer = ModelScorer(&model);
        assert_eq!(scorer.max_len(), model.config.max_seq_len);
        let short = vec![3u32, 9, 12, 40, 7];
        let long: Vec<u32> = (0..20).map(|i| (i * 7 % 64) as u32).collect();
        let alone = scorer.score(std::slice::from_ref(&short));
        let padded = scorer.score(&[short.clone(), long]);
        assert_eq!(alone[0].1, padded[0].1);
        for (a, b) in alone[0].0.iter().zip(&padded[0].0) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let (inputs, targets) = crate::inputs_and_targets::<B>(&short, 1, 4, &model.device);
        let nll: Vec<f32> = model
            .model
            .token_losses(inputs, targets)
            .into_data()
            .convert::<f32>()
            .into_vec()
            .unwrap();
        for (lp, n) in alone[0].0.iter().zip(nll) {
            assert!((lp + n as f64).abs() < 1e-5, "{lp} vs -{n}");
        }
    }
}
