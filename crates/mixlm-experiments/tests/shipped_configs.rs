//! Every config under `configs/` parses and validates: run configs as run configs,
//! comparison files (with `[[method]]`) as comparisons whose every method yields a
//! valid run config, mixing sections checked against the domains. Configs that
//! read prepared shards get a small stand-in corpus with their `keep` domains. A typo
//! in a shipped file fails here, not hours into a GPU job.

use std::path::{Path, PathBuf};

use mixlm_data::prepare::testutil::{jsonl, texts, write_file, write_tokenizer};
use mixlm_data::{prepare, PrepareConfig};
use mixlm_experiments::compare::CompareConfig;
use mixlm_train::RunConfig;

/// Shards with `domains`, each with more than `seq_len` tokens in every split.
fn stand_in_shards(dir: &Path, domains: &[String], seq_len: usize) -> PathBuf {
    let out = dir.join(domains.join("+"));
    if out.exists() {
        return out;
    }
    let tokenizer = dir.join("tokenizer.json");
    write_tokenizer(&tokenizer, 0);
    let text: String = texts(400, 3).join(" ");
    let doc = text.repeat(seq_len / text.len() + 2);
    for split in ["train", "validation", "test"] {
        let rows: Vec<(&str, String)> = domains.iter().map(|d| (d.as_str(), doc.clone())).collect();
        write_file(
            &out.join(format!("raw/{split}/part.jsonl")),
            jsonl(&rows).as_bytes(),
        );
    }
    prepare(&PrepareConfig {
        inputs: vec![out.join("raw").display().to_string()],
        tokenizer,
        output: out.join("shards"),
        ..PrepareConfig::default()
    })
    .unwrap();
    out
}

/// `data.path` overrides pointing a shards config at its stand-in corpus: its
/// `data.prepare.keep` domains, or two made-up ones when it keeps all.
fn data_overrides(tmp: &Path, file: &Path) -> Vec<String> {
    let table: toml::Table = toml::from_str(&std::fs::read_to_string(file).unwrap()).unwrap();
    let data = &table["data"];
    if data.get("source").and_then(|v| v.as_str()) != Some("shards") {
        return Vec::new();
    }
    let domains: Vec<String> = match data.get("prepare").and_then(|p| p.get("keep")) {
        Some(keep) => keep
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect(),
        None => vec!["one".into(), "two".into()],
    };
    let seq_len = table["run"]["seq_len"].as_integer().unwrap() as usize;
    let shards = stand_in_shards(tmp, &domains, seq_len).join("shards");
    vec![format!(
        "data.path={}",
        toml::Value::String(shards.display().to_string())
    )]
}

fn tomls(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            tomls(&path, out);
        } else if path.extension().is_some_and(|e| e == "toml") {
            out.push(path);
        }
    }
}

#[test]
fn every_shipped_config_loads() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut files = Vec::new();
    tomls(&root, &mut files);
    files.sort();
    let tmp = tempfile::tempdir().unwrap();
    let (mut runs, mut comparisons) = (0, 0);
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let table: toml::Table =
            toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        if table.contains_key("method") {
            let mut c =
                CompareConfig::load(file).unwrap_or_else(|e| panic!("{}: {e:#}", file.display()));
            if let Some(base) = &c.base {
                c.set.extend(data_overrides(tmp.path(), base));
                RunConfig::load(base, &c.set)
                    .and_then(|run| run.open_checked_source())
                    .unwrap_or_else(|e| panic!("{}: {e}", base.display()));
            }
            for m in &c.methods {
                let run = c
                    .run_config(m, c.seeds[0])
                    .unwrap_or_else(|e| panic!("{} method {}: {e:#}", file.display(), m.name));
                assert_eq!(run.run.name, format!("{}-s{}", m.name, c.seeds[0]));
                // An "Aioli + X" section is valid for the data's domains.
                if let Some(then) = &m.then {
                    let names = run.open_source().unwrap().domain_names();
                    then.validate(&names).unwrap_or_else(|e| {
                        panic!("{} method {} then: {e}", file.display(), m.name)
                    });
                }
            }
            comparisons += 1;
        } else {
            let overrides = data_overrides(tmp.path(), file);
            RunConfig::load(file, &overrides)
                .and_then(|run| run.open_checked_source())
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
            runs += 1;
        }
    }
    // demo + shared-corpus + six Aioli settings; demo + six Aioli comparisons and
    // their six restricted twins.
    assert!(
        runs >= 8 && comparisons >= 13,
        "{runs} run configs, {comparisons} comparisons"
    );
    // Every Aioli-paper comparison has its restricted-setting twin ("Aioli + X").
    let name = |f: &PathBuf| f.file_name().unwrap().to_string_lossy().into_owned();
    let aioli: Vec<String> = files
        .iter()
        .map(name)
        .filter(|n| n.starts_with("aioli-") && !n.ends_with("-restricted.toml"))
        .collect();
    assert_eq!(aioli.len(), 6, "{aioli:?}");
    for n in &aioli {
        let twin = root
            .join("compare")
            .join(n.replace(".toml", "-restricted.toml"));
        assert!(twin.exists(), "{n} has no restricted twin");
    }
}
