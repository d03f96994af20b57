//! `prepare` end to end on real files: CSV and Parquet in, Parquet out.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use cleanroom_prepare::identifier::{push_hex, Country, Hasher, Invalid, Kind, Normaliser};
use cleanroom_prepare::{load_key, prepare, InputFormat, PrepareError, PrepareOptions};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

const KEY: &[u8] = b"a collaboration key of 32 bytes!";

fn options(input: &Path, out: &Path, kind: Kind) -> PrepareOptions {
    PrepareOptions {
        input: input.to_path_buf(),
        format: InputFormat::from_path(input),
        id_column: if kind == Kind::Email { "email".into() } else { "phone".into() },
        uid_column: "uid".into(),
        normaliser: Normaliser { kind, provider_rules: false, default_country: Country::from_iso("DE") },
        hasher: Hasher::hmac(KEY),
        key_fingerprint: Some(cleanroom_prepare::key_fingerprint(KEY)),
        out_dir: out.to_path_buf(),
        overwrite: false,
        progress: false,
    }
}

fn hmac_hex(normalised: &str) -> String {
    let mut s = String::new();
    push_hex(&mut s, &Hasher::hmac(KEY).digest(normalised.as_bytes()));
    s
}

fn read(path: &Path) -> (Vec<RecordBatch>, std::collections::HashMap<String, String>) {
    let builder = ParquetRecordBatchReaderBuilder::try_new(File::open(path).unwrap()).unwrap();
    let kv = builder
        .metadata()
        .file_metadata()
        .key_value_metadata()
        .map(|kv| kv.iter().map(|k| (k.key.clone(), k.value.clone().unwrap_or_default())).collect())
        .unwrap_or_default();
    (builder.build().unwrap().map(Result::unwrap).collect(), kv)
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir).map(|d| d.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
    v.sort();
    v
}

#[test]
fn csv_emails_are_normalised_hashed_and_the_raw_column_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("customers.csv");
    std::fs::write(
        &input,
        "email,ltv,signup\n  Jane.Doe@Example.COM ,120,2026-01-02\njane.doe@example.com,80,2026-02-03\nnot-an-email,5,2026-03-04\n,7,2026-03-05\nbob@example.org,30,2026-04-05\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let report = prepare(&options(&input, &out, Kind::Email)).unwrap();
    assert_eq!((report.rows_read, report.rows_written, report.duplicates), (5, 3, 1));
    assert_eq!(report.invalid.get(&Invalid::NoAt), Some(&(1, vec![3])));
    assert_eq!(report.invalid.get(&Invalid::Missing), Some(&(1, vec![4])), "an empty CSV field is NULL");
    assert_eq!(report.output, out.join("customers.parquet"));
    assert_eq!(files_in(&out), vec![out.join("customers.parquet")], "no temporary file left");

    let (batches, kv) = read(&report.output);
    let batch = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
    let names: Vec<String> = batch.schema().fields().iter().map(|f| f.name().clone()).collect();
    assert_eq!(names, ["uid", "ltv", "signup"], "the raw identifier is gone, uid comes first");
    let uids = batch.column(0).as_any().downcast_ref::<StringArray>().unwrap();
    let jane = hmac_hex("jane.doe@example.com");
    assert_eq!(uids.iter().flatten().collect::<Vec<_>>(), [jane.as_str(), jane.as_str(), &hmac_hex("bob@example.org")]);
    let ltv = batch.column(1).as_any().downcast_ref::<Int64Array>().unwrap();
    assert_eq!(ltv.values().to_vec(), [120, 80, 30], "other columns keep their rows and inferred types");
    assert_eq!(kv["cleanroom.prepare.hash"], "hmac-sha256");
    assert_eq!(kv["cleanroom.prepare.normalisation"], "email: trim, lower-case");
    assert_eq!(kv["cleanroom.prepare.key_fingerprint"], cleanroom_prepare::key_fingerprint(KEY));
    // The raw e-mails are nowhere in the file.
    let bytes = std::fs::read(&report.output).unwrap();
    assert!(!bytes.windows(8).any(|w| w == b"jane.doe" || w == b"Jane.Doe"));
}

#[test]
fn provider_rules_are_recorded_in_the_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("list.csv");
    std::fs::write(&input, "email\nJane.Doe+shop@gmail.com\njanedoe@googlemail.com\n").unwrap();
    let mut o = options(&input, &dir.path().join("out"), Kind::Email);
    o.normaliser.provider_rules = true;
    let report = prepare(&o).unwrap();
    assert_eq!(report.duplicates, 1, "both addresses are the same Gmail inbox");
    let (_, kv) = read(&report.output);
    assert!(kv["cleanroom.prepare.normalisation"].contains("provider rules"));
}

#[test]
fn phones_in_parquet_become_e164_before_hashing() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("crm.parquet");
    let schema = Arc::new(Schema::new(vec![Field::new("phone", DataType::Utf8, true), Field::new("n", DataType::Int64, false)]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec![Some("030 1234 5678"), Some("+49 30 12345678"), Some("call me"), None])),
            Arc::new(Int64Array::from(vec![1, 2, 3, 4])),
        ],
    )
    .unwrap();
    let mut w = parquet::arrow::ArrowWriter::try_new(File::create(&input).unwrap(), schema, None).unwrap();
    w.write(&batch).unwrap();
    w.close().unwrap();
    let report = prepare(&options(&input, &dir.path().join("out"), Kind::Phone)).unwrap();
    assert_eq!((report.rows_read, report.rows_written, report.duplicates), (4, 2, 1));
    assert_eq!(report.invalid.get(&Invalid::BadCharacter), Some(&(1, vec![3])));
    let (batches, _) = read(&report.output);
    let uids = batches[0].column(0).as_any().downcast_ref::<StringArray>().unwrap();
    assert_eq!(uids.value(0), hmac_hex("+493012345678"));
}

#[test]
fn a_malformed_csv_line_is_named_and_leaves_no_output() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("broken.csv");
    let mut text = String::from("email,ltv\n");
    for i in 0..10 {
        text.push_str(&format!("p{i}@example.com,{i}\n"));
    }
    text.push_str("p10@example.com,10,surplus\n");
    std::fs::write(&input, text).unwrap();
    let out = dir.path().join("out");
    let err = prepare(&options(&input, &out, Kind::Email)).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, PrepareError::Input { .. }), "{message}");
    assert!(message.contains("line 12") || message.contains("line 11"), "names the line: {message}");
    assert!(files_in(&out).is_empty(), "no partial output: {:?}", files_in(&out));

    // Bytes that are not text: named by line, no row data echoed.
    let mut text = b"email,ltv\n".to_vec();
    for i in 0..10 {
        text.extend(format!("p{i}@example.com,{i}\n").bytes());
    }
    text.extend(b"secret@example.com,\xff\xfe\n");
    std::fs::write(&input, text).unwrap();
    let err = prepare(&options(&input, &out, Kind::Email)).unwrap_err().to_string();
    assert!(err.contains("line 12") || err.contains("line 11"), "{err}");
    assert!(!err.contains("secret@example.com"), "the row's identifier is not echoed: {err}");
    assert!(files_in(&out).is_empty());
}

#[test]
fn an_unknown_id_column_lists_the_columns() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("c.csv");
    std::fs::write(&input, "mail,ltv\na@example.com,1\n").unwrap();
    let err = prepare(&options(&input, &dir.path().join("out"), Kind::Email)).unwrap_err().to_string();
    assert!(err.contains("no column `email`") && err.contains("mail, ltv"), "{err}");
}

#[test]
fn an_empty_or_short_key_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k");
    std::fs::write(&key, "\n").unwrap();
    assert!(load_key(&key).unwrap_err().to_string().contains("the key file is empty"));
    std::fs::write(&key, "short\n").unwrap();
    assert!(load_key(&key).unwrap_err().to_string().contains("fewer than 16"));
    std::fs::write(&key, "0123456789abcdef0123456789abcdef\n").unwrap();
    assert_eq!(load_key(&key).unwrap(), b"0123456789abcdef0123456789abcdef");
}

#[test]
fn an_existing_output_is_not_overwritten_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("c.csv");
    std::fs::write(&input, "email\na@example.com\n").unwrap();
    let out = dir.path().join("out");
    prepare(&options(&input, &out, Kind::Email)).unwrap();
    let err = prepare(&options(&input, &out, Kind::Email)).unwrap_err().to_string();
    assert!(err.contains("already exists"), "{err}");
    let mut o = options(&input, &out, Kind::Email);
    o.overwrite = true;
    prepare(&o).unwrap();
}
