//! The reference VMM refuses bad input with a clear error and a non-zero
//! status, never a panic.

mod common;

use common::{assert_clean_failure, require_kvm, run_minimal, stdout, tiny_elf, TempFile};

#[test]
fn a_file_that_is_not_a_kernel_is_refused() {
    let f = TempFile::new("notes.txt", b"this is not a kernel\n");
    let out = run_minimal(&["--kernel", f.arg()]);
    assert_clean_failure(&out, "not a kernel image");
}

#[test]
fn an_empty_file_is_refused() {
    let f = TempFile::new("empty", b"");
    assert_clean_failure(&run_minimal(&["--kernel", f.arg()]), "empty file");
}

#[test]
fn a_truncated_elf_is_refused() {
    let elf = tiny_elf(0x20_0000, &[0xf4; 64]);
    let f = TempFile::new("truncated.elf", &elf[..100]);
    assert_clean_failure(
        &run_minimal(&["--kernel", f.arg()]),
        "unsupported ELF image",
    );
}

#[test]
fn a_missing_kernel_is_refused() {
    let out = run_minimal(&["--kernel", "/nonexistent/vmlinux"]);
    assert_clean_failure(&out, "cannot open kernel /nonexistent/vmlinux");
}

#[test]
fn a_directory_is_not_a_kernel() {
    let f = TempFile::new("x", b"");
    let dir = f.path.parent().expect("temp dir").to_str().expect("utf-8");
    assert_clean_failure(
        &run_minimal(&["--kernel", dir]),
        "is a directory, not a regular file",
    );
}

#[test]
fn a_missing_initrd_is_refused() {
    assert_clean_failure(
        &run_minimal(&["--initrd", "/nonexistent/initrd"]),
        "cannot open initrd",
    );
}

#[test]
fn memory_too_small_for_the_kernel_is_refused() {
    // A kernel that loads at 64 MiB in a 32 MiB guest.
    let f = TempFile::new("high.elf", &tiny_elf(0x400_0000, &[0xf4; 64]));
    let out = run_minimal(&["--kernel", f.arg(), "--mem", "32"]);
    assert_clean_failure(&out, "not inside guest RAM");
}

#[test]
fn memory_below_the_minimum_is_refused() {
    assert_clean_failure(&run_minimal(&["--mem", "1"]), "too small");
}

#[test]
fn pvh_on_a_kernel_without_the_note_is_refused() {
    let f = TempFile::new("plain.elf", &tiny_elf(0x20_0000, &[0xf4; 64]));
    let out = run_minimal(&["--kernel", f.arg(), "--boot-protocol", "pvh"]);
    assert_clean_failure(&out, "does not support the pvh boot protocol");
}

#[test]
fn a_bad_command_line_is_refused() {
    assert_clean_failure(
        &run_minimal(&["--cmdline", "a\u{7}b"]),
        "'\\u{7}' at position 1",
    );
}

#[test]
fn bad_flags_are_usage_errors() {
    let out = run_minimal(&["--mem", "lots"]);
    assert_eq!(out.status.code(), Some(3), "usage errors are 3");
    assert!(common::stderr(&out).contains("invalid value"));
    let out = run_minimal(&["--exit-port", "70000"]);
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn inspect_kernel_reports_format_and_protocols_and_boots_nothing() {
    let f = TempFile::new("guest.elf", vmm_kit::testguest::IMAGE);
    let out = run_minimal(&["--inspect-kernel", f.arg()]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("format: ELF"), "{text}");
    assert!(text.contains("protocols: pvh, linux64"), "{text}");
    assert!(!text.contains("testguest:"), "nothing booted");
    let bad = TempFile::new("bad", b"MZ\x90\x00");
    assert_clean_failure(
        &run_minimal(&["--inspect-kernel", bad.arg()]),
        "not a kernel image",
    );
}

#[test]
fn a_kernel_that_faults_at_once_ends_the_vm() {
    // An ELF whose code is `ud2`: the vCPU takes #UD with no IDT, then a
    // triple fault. The VMM must end, not hang.
    require_kvm();
    let f = TempFile::new("ud2.elf", &tiny_elf(0x20_0000, &[0x0f, 0x0b]));
    let out = run_minimal(&["--kernel", f.arg(), "--boot-protocol", "linux64"]);
    let err = common::stderr(&out);
    assert_eq!(
        out.status.code(),
        Some(5),
        "a triple fault is a crash, not success: {err}"
    );
    assert!(
        err.contains("triple-faulted"),
        "the VMM says what happened: {err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
