# vjobs-reseed: credit the host's entropy to the guest kernel and force its RNG to reseed.
# A guest restored from a template starts with the template's random state; without this, two jobs could
# read the same /dev/urandom bytes. Reads 32 bytes from argv[1] (the job's entropy file, written by the
# host), adds them with RNDADDENTROPY (256 bits credited: the host is trusted), then RNDRESEEDCRNG.
# Exit status 0 on success, 1 when any step fails. No libc: a static x86-64 ELF of 584 bytes, committed as
# vjobs-reseed beside this file (busybox cannot make an ioctl, and a worker node need not have a compiler):
#   as -o r.o vjobs-reseed.S && ld --build-id=none -static -s -N -o vjobs-reseed r.o
# tests/drivers/qemu_user/test_template.py checks that the binary is what this source assembles to.
    .intel_syntax noprefix
    .globl _start
_start:
    mov rdi, [rsp+16]           # argv[1]
    test rdi, rdi
    jz fail
    xor esi, esi                # O_RDONLY
    mov eax, 2                  # open
    syscall
    test eax, eax
    js fail
    mov edi, eax
    lea rsi, [rip+entropy]
    mov edx, 32
    xor eax, eax                # read
    syscall
    cmp eax, 32
    jne fail
    lea rdi, [rip+urandom]
    mov esi, 1                  # O_WRONLY
    mov eax, 2                  # open
    syscall
    test eax, eax
    js fail
    mov r12d, eax
    mov edi, eax
    mov esi, 0x40085203         # RNDADDENTROPY
    lea rdx, [rip+info]
    mov eax, 16                 # ioctl
    syscall
    test eax, eax
    jnz fail
    mov edi, r12d
    mov esi, 0x5207             # RNDRESEEDCRNG
    mov eax, 16                 # ioctl
    syscall
    test eax, eax
    jnz fail
    xor edi, edi
    jmp leave
fail:
    mov edi, 1
leave:
    mov eax, 60                 # exit
    syscall
urandom:
    .asciz "/dev/urandom"
    .data
info:
    .long 256                   # entropy_count (bits)
    .long 32                    # buf_size (bytes)
entropy:
    .fill 32, 1, 0
