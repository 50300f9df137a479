/* Multiboot (v1) entry of the secmig reference guest.
 *
 * QEMU's -kernel loads a 32-bit ELF that carries this header, enters _start in flat protected mode
 * with paging off, EAX = the multiboot magic and EBX = the multiboot information block.
 */
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, (1 << 0) | (1 << 1)      /* page-aligned modules, memory information */

        .section .multiboot, "a"
        .align 4
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

        .section .bss
        .align 16
stack_bottom:
        .skip 16384
stack_top:

        .section .text
        .global _start
        .type _start, @function
_start:
        cli
        mov $stack_top, %esp
        push %ebx
        push %eax
        call kmain
1:      cli
        hlt
        jmp 1b

        .section .note.GNU-stack, "", @progbits
