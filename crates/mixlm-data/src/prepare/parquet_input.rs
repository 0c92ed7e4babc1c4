//! Reading `.parquet` inputs (SlimPajama-6B: columns `text`, `meta` (a struct with
//! `redpajama_set_name`) and `__index_level_0__`).
//!
//! The dotted keys of `data.prepare.text_key` / `domain_key` (and `quality_keys`,
//! which may name numeric columns) are followed through
//! struct columns; where the path meets a string column before its end (a `meta`
//! column holding JSON text, as some exports store it), the rest of the key is looked
//! up in that JSON. Only the root columns the keys name are decoded, one record
//! batch at a time, so memory stays bounded whatever the file size.

use super::ingest::{
    describe, field_problem, json_number, Document, Ingestor, InputFile, Record, SinkClosed,
};
use super::{PrepareError, SkipKind};
use arrow_array::cast::AsArray;
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use std::borrow::Cow;
use std::fs::File;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Rows decoded per record batch: small enough to bound memory with long documents,
/// large enough that per-batch overhead does not show.
const BATCH_ROWS: usize = 1024;

/// What a key holds in one row.
enum Value<'a> {
    Missing,
    Str(Cow<'a, str>),
    /// A number (only quality keys accept one).
    Num(f64),
    /// A value of another type: its description for the message.
    Other(String),
    /// Bytes that are not UTF-8, with the offset of the first bad byte.
    NotUtf8(usize),
}

/// A dotted key resolved against one record batch.
struct KeyColumn {
    /// Arrays from the root column down to the one holding the value, so a null at
    /// any level reads as a missing value.
    levels: Vec<ArrayRef>,
    /// Dictionary-encoded leaf: the keys, normalised to indexes into `levels`' last
    /// array's values (computed once per batch, not per row).
    dictionary: Option<(Vec<usize>, ArrayRef)>,
    /// The rest of the key below a string column that holds JSON, as a JSON pointer.
    json_rest: Option<String>,
}

/// The string or number in `array` at `row` (no null check), or what else is there.
fn leaf_at(array: &dyn Array, row: usize) -> Value<'_> {
    use arrow_array::types::*;
    let num = |x: f64| Value::Num(x);
    let bytes = |b: &[u8]| -> Value<'_> {
        match std::str::from_utf8(b) {
            Ok(s) => Value::Str(Cow::Owned(s.to_string())),
            Err(e) => Value::NotUtf8(e.valid_up_to()),
        }
    };
    match array.data_type() {
        DataType::Utf8 => Value::Str(Cow::Borrowed(array.as_string::<i32>().value(row))),
        DataType::LargeUtf8 => Value::Str(Cow::Borrowed(array.as_string::<i64>().value(row))),
        DataType::Utf8View => Value::Str(Cow::Borrowed(array.as_string_view().value(row))),
        DataType::Binary => bytes(array.as_binary::<i32>().value(row)),
        DataType::LargeBinary => bytes(array.as_binary::<i64>().value(row)),
        DataType::BinaryView => bytes(array.as_binary_view().value(row)),
        DataType::Float32 => num(array.as_primitive::<Float32Type>().value(row) as f64),
        DataType::Float64 => num(array.as_primitive::<Float64Type>().value(row)),
        DataType::Int8 => num(array.as_primitive::<Int8Type>().value(row) as f64),
        DataType::Int16 => num(array.as_primitive::<Int16Type>().value(row) as f64),
        DataType::Int32 => num(array.as_primitive::<Int32Type>().value(row) as f64),
        DataType::Int64 => num(array.as_primitive::<Int64Type>().value(row) as f64),
        DataType::UInt8 => num(array.as_primitive::<UInt8Type>().value(row) as f64),
        DataType::UInt16 => num(array.as_primitive::<UInt16Type>().value(row) as f64),
        DataType::UInt32 => num(array.as_primitive::<UInt32Type>().value(row) as f64),
        DataType::UInt64 => num(array.as_primitive::<UInt64Type>().value(row) as f64),
        other => Value::Other(format!("a `{other}` column")),
    }
}

fn is_stringish(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Binary
            | DataType::LargeBinary
            | DataType::BinaryView
    )
}

impl KeyColumn {
    /// Follows `segments` (the dotted key split at `.`) from `root` down through
    /// struct fields. `Err` names the first segment that is not there.
    fn resolve(root: ArrayRef, segments: &[&str]) -> Result<Self, String> {
        let mut levels = vec![root];
        let mut json_rest = None;
        for (depth, seg) in segments.iter().enumerate().skip(1) {
            let current = levels.last().expect("root").clone();
            let prefix = segments[..depth].join(".");
            match current.data_type() {
                DataType::Struct(fields) => {
                    let child = current.as_struct().column_by_name(seg).ok_or_else(|| {
                        let names: Vec<&str> = fields.iter().map(|f| f.name().as_str()).collect();
                        format!(
                            "the struct column `{prefix}` has no field `{seg}` (its fields: {})",
                            names.join(", ")
                        )
                    })?;
                    levels.push(child.clone());
                }
                t if is_stringish(t) || matches!(t, DataType::Dictionary(..)) => {
                    json_rest = Some(super::ingest::json_pointer(&segments[depth..].join(".")));
                    break;
                }
                other => {
                    return Err(format!(
                        "`{prefix}` is a `{other}` column, so it has no field `{seg}`"
                    ))
                }
            }
        }
        let leaf = levels.last().expect("root");
        let dictionary = leaf
            .as_any_dictionary_opt()
            .map(|d| (d.normalized_keys(), d.values().clone()));
        Ok(Self {
            levels,
            dictionary,
            json_rest,
        })
    }

    fn value(&self, row: usize) -> Value<'_> {
        if self.levels.iter().any(|a| a.is_null(row)) {
            return Value::Missing;
        }
        let leaf = match &self.dictionary {
            Some((keys, values)) => leaf_at(values.as_ref(), keys[row]),
            None => leaf_at(self.levels.last().expect("root").as_ref(), row),
        };
        let Some(pointer) = &self.json_rest else {
            return leaf;
        };
        let Value::Str(text) = leaf else {
            return leaf;
        };
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(mut v) => match v.pointer_mut(pointer).map(|x| x.take()) {
                Some(serde_json::Value::String(s)) => Value::Str(Cow::Owned(s)),
                Some(serde_json::Value::Number(n)) => n.as_f64().map_or_else(
                    || Value::Other("a number out of range".to_string()),
                    Value::Num,
                ),
                Some(other) => Value::Other(describe(&other).to_string()),
                None => Value::Missing,
            },
            Err(_) => Value::Other("a string column that does not hold JSON".to_string()),
        }
    }
}

impl KeyColumn {
    /// The value in `row` as a quality number, or what is wrong with it.
    fn number(&self, row: usize) -> Result<f64, String> {
        match self.value(row) {
            Value::Num(x) if x.is_finite() => Ok(x),
            Value::Num(x) => Err(format!("is {x}, not a finite number")),
            Value::Str(s) => json_number(Some(&serde_json::Value::String(s.into_owned()))),
            Value::Missing => Err("is missing".into()),
            Value::Other(what) => Err(format!("is {what}, not a number")),
            Value::NotUtf8(_) => Err("is not valid UTF-8".into()),
        }
    }
}

impl Ingestor {
    /// Streams one parquet file's rows into `sink`, in row order; `Document::line` is
    /// the 1-based row. Same contract as [`Ingestor::read_file`].
    pub(crate) fn read_parquet(
        &mut self,
        index: usize,
        file: &InputFile,
        consumed: &Arc<AtomicU64>,
        sink: &mut dyn FnMut(Document) -> Result<(), SinkClosed>,
    ) -> Result<bool, PrepareError> {
        let path = &file.path;
        let handle = File::open(path).map_err(|e| PrepareError::io(path, e))?;
        let builder = match ParquetRecordBatchReaderBuilder::try_new(handle) {
            Ok(b) => b,
            Err(e) => {
                self.problem(
                    path,
                    None,
                    SkipKind::CorruptFile,
                    format!("the file is not readable parquet ({e})"),
                )?;
                consumed.fetch_add(file.bytes, Ordering::Relaxed);
                return Ok(true);
            }
        };
        let total_rows = builder.metadata().file_metadata().num_rows().max(0) as u64;
        if total_rows == 0 {
            self.problem(
                path,
                None,
                SkipKind::EmptyFile,
                "the file is empty (no rows)".to_string(),
            )?;
            consumed.fetch_add(file.bytes, Ordering::Relaxed);
            return Ok(true);
        }

        // The root columns the keys start at.
        let text_key = self.options.text_key.clone();
        let domain_key = self.options.domain_key.clone();
        let text_segments: Vec<&str> = text_key.split('.').collect();
        let domain_segments: Vec<&str> = domain_key.split('.').collect();
        let quality = self.options.quality.clone();
        let quality_segments: Vec<Vec<&str>> = quality
            .iter()
            .flat_map(|q| q.keys.iter().map(|k| k.split('.').collect()))
            .collect();
        let root_names: Vec<String> = builder
            .parquet_schema()
            .root_schema()
            .get_fields()
            .iter()
            .map(|f| f.name().to_string())
            .collect();
        let mut roots = Vec::new();
        let keys = [
            (&domain_segments, SkipKind::BadDomain, "domain_key"),
            (&text_segments, SkipKind::BadText, "text_key"),
        ]
        .into_iter()
        .chain(
            quality_segments
                .iter()
                .map(|s| (s, SkipKind::BadQuality, "quality_keys")),
        );
        for (segments, kind, setting) in keys {
            match root_names.iter().position(|n| n == segments[0]) {
                Some(i) => roots.push(i),
                None => {
                    self.problem(
                        path,
                        None,
                        kind,
                        format!(
                            "the file has no column `{}` (data.prepare.{setting}); its columns \
                             are: {}",
                            segments[0],
                            root_names.join(", ")
                        ),
                    )?;
                    consumed.fetch_add(file.bytes, Ordering::Relaxed);
                    return Ok(true);
                }
            }
        }
        roots.sort_unstable();
        roots.dedup();
        let mask = ProjectionMask::roots(builder.parquet_schema(), roots.iter().copied());
        let reader = builder
            .with_projection(mask)
            .with_batch_size(BATCH_ROWS)
            .build()
            .map_err(|e| PrepareError::io(path, std::io::Error::other(e)))?;

        let mut rows_done = 0u64;
        let mut bytes_reported = 0u64;
        for batch in reader {
            let batch: RecordBatch = match batch {
                Ok(b) => b,
                Err(e) => {
                    self.problem(
                        path,
                        Some(rows_done + 1),
                        SkipKind::CorruptFile,
                        format!(
                            "the parquet data is corrupt ({e}); {rows_done} rows were read \
                             before it"
                        ),
                    )?;
                    break;
                }
            };
            let column = |name: &str| {
                batch
                    .column_by_name(name)
                    .expect("projected root column")
                    .clone()
            };
            let domain_col = KeyColumn::resolve(column(domain_segments[0]), &domain_segments);
            let text_col = KeyColumn::resolve(column(text_segments[0]), &text_segments);
            let (domain_col, text_col) = match (domain_col, text_col) {
                (Ok(d), Ok(t)) => (d, t),
                (Err(detail), _) => {
                    self.problem(
                        path,
                        None,
                        SkipKind::BadDomain,
                        format!("{detail} (data.prepare.domain_key = `{domain_key}`)"),
                    )?;
                    break;
                }
                (_, Err(detail)) => {
                    self.problem(
                        path,
                        None,
                        SkipKind::BadText,
                        format!("{detail} (data.prepare.text_key = `{text_key}`)"),
                    )?;
                    break;
                }
            };
            let quality_cols: Result<Vec<KeyColumn>, String> = quality_segments
                .iter()
                .map(|s| KeyColumn::resolve(column(s[0]), s))
                .collect();
            let quality_cols = match quality_cols {
                Ok(c) => c,
                Err(detail) => {
                    self.problem(
                        path,
                        None,
                        SkipKind::BadQuality,
                        format!("{detail} (data.prepare.quality_keys)"),
                    )?;
                    break;
                }
            };
            for row in 0..batch.num_rows() {
                let row_no = rows_done + row as u64 + 1;
                let record = (|| {
                    Ok(Record {
                        domain: self.key_value(&domain_col, row, SkipKind::BadDomain)?,
                        text: self.key_value(&text_col, row, SkipKind::BadText)?,
                        quality: match &quality {
                            None => None,
                            Some(q) => Some(q.score(|i| quality_cols[i].number(row))?),
                        },
                    })
                })();
                if !self.emit(index, file, row_no, record, sink)? {
                    return Ok(false);
                }
            }
            rows_done += batch.num_rows() as u64;
            let target = file.bytes * rows_done.min(total_rows) / total_rows;
            consumed.fetch_add(target - bytes_reported, Ordering::Relaxed);
            bytes_reported = target;
        }
        consumed.fetch_add(file.bytes - bytes_reported, Ordering::Relaxed);
        Ok(true)
    }

    /// The string a key holds in `row`, or the problem (`kind` for a missing or
    /// non-string value; invalid UTF-8 is its own kind).
    fn key_value(
        &self,
        column: &KeyColumn,
        row: usize,
        kind: SkipKind,
    ) -> Result<String, (SkipKind, String)> {
        match column.value(row) {
            Value::Str(s) => Ok(s.into_owned()),
            Value::Num(_) => Err(field_problem(&self.options, kind, Some("a number"))),
            Value::Missing => match (kind, &self.options.default_domain) {
                (SkipKind::BadDomain, Some(d)) => Ok(d.clone()),
                _ => Err(field_problem(&self.options, kind, None)),
            },
            Value::Other(what) => Err(field_problem(&self.options, kind, Some(&what))),
            Value::NotUtf8(at) => {
                let key = match kind {
                    SkipKind::BadDomain => &self.options.domain_key,
                    _ => &self.options.text_key,
                };
                Err((
                    SkipKind::InvalidUtf8,
                    format!("`{key}` is not valid UTF-8 (bad byte at offset {at})"),
                ))
            }
        }
    }
}
