//! TensorBoard event files (`events.out.tfevents.*`): scalars and text, written as a
//! run goes, so `tensorboard --logdir runs/` shows a live run.
//!
//! The format is TensorFlow's record file of `Event` protocol buffers: each record is
//! its length (u64, little-endian), the masked CRC-32C of those 8 bytes, the bytes,
//! and their masked CRC-32C (`tensorflow/core/lib/io/record_writer.cc`; TensorBoard's
//! reader checks both, `tensorboard/data/server/tf_record.rs`). The messages below
//! carry the field numbers of `tensorboard/compat/proto/{event,summary,tensor,
//! tensor_shape}.proto`. The published writer crates were read and not taken:
//! `tboard` needs `protoc` at build time, `tensorboard-rs` panics on a write error
//! (a full disk would end the run) and cannot write text, `tfrecord` downloads at
//! build time, and `syntaxdot-summary` writes only scalars with the clock's time.
//!
//! Every write returns an `io::Result`: the caller decides that a failure is a warning.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;

/// `Event` (event.proto): a wall time, a step, and either the file version or a summary.
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    #[prost(int64, tag = "2")]
    pub step: i64,
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
}

/// `Summary` (summary.proto).
#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

/// `Summary.Value`: a scalar (`simple_value`) or a tensor with plugin metadata (text).
#[derive(Clone, PartialEq, Message)]
pub struct Value {
    #[prost(string, tag = "1")]
    pub tag: String,
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
    #[prost(message, optional, tag = "8")]
    pub tensor: Option<TensorProto>,
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
}

/// `SummaryMetadata`: which plugin shows a value.
#[derive(Clone, PartialEq, Message)]
pub struct SummaryMetadata {
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
    /// `DataClass`: 2 is a tensor.
    #[prost(int32, tag = "4")]
    pub data_class: i32,
}

/// `SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, Message)]
pub struct PluginData {
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

/// `TensorProto` (tensor.proto), as the text plugin reads it: a string scalar.
#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    /// `DataType`: 7 is `DT_STRING`.
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShape>,
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

/// `TensorShapeProto`: no dimensions (a scalar).
#[derive(Clone, PartialEq, Message)]
pub struct TensorShape {}

const DT_STRING: i32 = 7;
const DATA_CLASS_TENSOR: i32 = 2;

const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// TensorFlow's masked CRC-32C (`tensorflow/core/lib/hash/crc32c.h`, `Mask`).
pub fn masked_crc(bytes: &[u8]) -> u32 {
    let crc = CRC32C.checksum(bytes);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Seconds since the Unix epoch, as events carry them.
pub fn now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// One value of a summary: a scalar, or text (markdown, as TensorBoard's text tab shows
/// it).
#[derive(Debug, Clone, PartialEq)]
pub enum Point {
    Scalar(f64),
    Text(String),
}

/// Appends events to one new `events.out.tfevents.*` file in a folder.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates the folder if needed and a new event file in it, named as TensorFlow
    /// names them (TensorBoard reads every file whose name contains `tfevents`, in name
    /// order), and writes the file-version event. `index` tells apart files created
    /// in the same second by one process.
    pub fn create(dir: &Path, wall_time: f64, index: u32) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let host = hostname();
        let name = format!(
            "events.out.tfevents.{:010}.{host}.{}.{index}",
            wall_time as u64,
            std::process::id()
        );
        let path = dir.join(name);
        let file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)?;
        let mut writer = Self {
            path,
            out: BufWriter::new(file),
        };
        writer.write_event(&Event {
            wall_time,
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        })?;
        Ok(writer)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// One event of `points` at `step`.
    pub fn write(
        &mut self,
        step: u64,
        wall_time: f64,
        points: &[(String, Point)],
    ) -> io::Result<()> {
        let value = points
            .iter()
            .map(|(tag, point)| match point {
                Point::Scalar(v) => Value {
                    tag: tag.clone(),
                    simple_value: Some(*v as f32),
                    ..Default::default()
                },
                Point::Text(text) => Value {
                    tag: tag.clone(),
                    tensor: Some(TensorProto {
                        dtype: DT_STRING,
                        tensor_shape: Some(TensorShape {}),
                        string_val: vec![text.as_bytes().to_vec()],
                    }),
                    metadata: Some(SummaryMetadata {
                        plugin_data: Some(PluginData {
                            plugin_name: "text".into(),
                            content: Vec::new(),
                        }),
                        data_class: DATA_CLASS_TENSOR,
                    }),
                    ..Default::default()
                },
            })
            .collect();
        self.write_event(&Event {
            wall_time,
            step: step as i64,
            file_version: None,
            summary: Some(Summary { value }),
        })
    }

    fn write_event(&mut self, event: &Event) -> io::Result<()> {
        let data = event.encode_to_vec();
        let len = (data.len() as u64).to_le_bytes();
        self.out.write_all(&len)?;
        self.out.write_all(&masked_crc(&len).to_le_bytes())?;
        self.out.write_all(&data)?;
        self.out.write_all(&masked_crc(&data).to_le_bytes())
    }

    /// Hands what is buffered to the file (TensorBoard reads it on its next poll).
    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The machine's name for file names (`/proc/sys/kernel/hostname`, else `localhost`),
/// kept to characters that are safe in a file name.
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let name: String = name
        .trim()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .collect();
    if name.is_empty() {
        "localhost".into()
    } else {
        name
    }
}

/// Reads every event of an event file, checking both CRCs of every record; a torn last
/// record (a killed writer) ends the list. For tests and `mixlm` tools; TensorBoard has
/// its own reader.
pub fn read_events(path: &Path) -> io::Result<Vec<Event>> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{}: {what}", path.display()),
        )
    };
    let mut events = Vec::new();
    let mut rest = &bytes[..];
    while rest.len() >= 12 {
        let (len, crc) = (
            &rest[..8],
            u32::from_le_bytes(rest[8..12].try_into().unwrap()),
        );
        if masked_crc(len) != crc {
            return Err(bad("record length fails its CRC"));
        }
        let n = u64::from_le_bytes(len.try_into().unwrap()) as usize;
        let Some(record) = rest.get(12..12 + n + 4) else {
            break;
        };
        let (data, crc) = record.split_at(n);
        if masked_crc(data) != u32::from_le_bytes(crc.try_into().unwrap()) {
            return Err(bad("record data fails its CRC"));
        }
        events.push(Event::decode(data).map_err(|e| bad(&e.to_string()))?);
        rest = &rest[12 + n + 4..];
    }
    Ok(events)
}

/// The event files of a folder, in the order TensorBoard reads them (by name).
pub fn event_files(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.contains("tfevents"))
            })
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CRC-32C and its mask against TensorFlow's own numbers: the check value of the
    /// CRC-32C catalogue, the CRC of 32 zero bytes (RFC 3720, B.4: 0x8a9136aa), and a
    /// masked CRC from TensorBoard's `masked_crc.rs` test.
    #[test]
    fn crc_and_mask_match_tensorflow() {
        assert_eq!(CRC32C.checksum(b"123456789"), 0xe306_9283);
        assert_eq!(CRC32C.checksum(&[0u8; 32]), 0x8a91_36aa);
        assert_eq!(masked_crc(b"\x1a\x11CRC test, one two"), 0x5794_d08a);
    }

    /// The first record of a real TensorFlow event file (TensorBoard's `tf_record.rs`
    /// test): the file-version event at wall time 1599759586, and both its CRCs.
    #[test]
    fn file_version_event_encodes_as_tensorflow_writes_it() {
        let event = Event {
            wall_time: 1_599_759_586.0,
            step: 0,
            file_version: Some("brain.Event:2".into()),
            summary: None,
        };
        let data = event.encode_to_vec();
        assert_eq!(
            data,
            b"\x09\x00\x00\x80\x38\x99\xd6\xd7\x41\x1a\x0dbrain.Event:2"
        );
        assert_eq!(masked_crc(&data), 0xab36_4b12);
        assert_eq!(
            masked_crc(&24u64.to_le_bytes()).to_le_bytes(),
            [0xa3, 0x7f, 0x4b, 0x22]
        );
    }

    /// Written events read back with both CRCs checked; a torn last record is dropped,
    /// a flipped byte is an error naming the file.
    #[test]
    fn events_round_trip_and_damage_is_found() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = EventWriter::create(dir.path(), 1000.5, 0).unwrap();
        let points = vec![
            ("loss".to_string(), Point::Scalar(2.5)),
            ("notes".to_string(), Point::Text("| a | b |".into())),
        ];
        w.write(7, 1001.0, &points).unwrap();
        w.write(8, 1002.0, &points[..1]).unwrap();
        w.flush().unwrap();
        let path = w.path().to_path_buf();
        assert!(path
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("events.out.tfevents.0000001000."));
        let events = read_events(&path).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!((events[1].step, events[1].wall_time), (7, 1001.0));
        let values = &events[1].summary.as_ref().unwrap().value;
        assert_eq!(values[0].simple_value, Some(2.5));
        assert_eq!(
            values[1].tensor.as_ref().unwrap().string_val,
            vec![b"| a | b |".to_vec()]
        );
        assert_eq!(event_files(dir.path()).unwrap(), vec![path.clone()]);

        let mut bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert_eq!(read_events(&path).unwrap().len(), 2, "torn last record");
        let n = bytes.len();
        bytes[n - 10] ^= 0x40;
        std::fs::write(&path, &bytes).unwrap();
        let err = read_events(&path).unwrap_err().to_string();
        assert!(
            err.contains("fails its CRC") && err.contains("tfevents"),
            "{err}"
        );
    }
}
