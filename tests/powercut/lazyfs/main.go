// lazyfs mounts a directory through FUSE and keeps every write that was not synced apart,
// so that a "power cut" can drop it, as Jepsen's LazyFS does for its tests. The power-cut
// test of webhook-operator (tests/kubernetes/powercut.rs) runs the operator's data
// directory on it.
//
// Writes reach the backing file at once (so reads see them, as the page cache would show
// them), and the bytes and length they replaced are kept in an undo log per file. An
// fsync or fdatasync of a file forgets its log: what it covered is durable. SIGUSR1 is
// the power cut: every file's log is applied newest first, which leaves each file as its
// last sync left it, then the file system is unmounted and lazyfs exits. Creating,
// renaming and removing files are durable at once (the queue's files are made once).
//
// Usage: lazyfs <backing dir> <mount point>. It prints "mounted" once serving, and on
// SIGUSR1 "crashed: <n> unsynced writes dropped" before it exits.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"sync"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// undo restores what one write or length change replaced.
type undo struct {
	off  int64
	old  []byte
	size int64 // the file's length before it
}

var (
	mu    sync.Mutex
	logs  = map[string][]undo{} // backing path -> unsynced changes, oldest first
	total int
)

// remember keeps what [off, off+n) and the length of the file at path hold now.
func remember(path string, fd int, off, n int64) {
	var st syscall.Stat_t
	if err := syscall.Fstat(fd, &st); err != nil {
		return
	}
	u := undo{off: off, size: st.Size}
	if end := min(off+n, st.Size); end > off {
		u.old = make([]byte, end-off)
		if _, err := syscall.Pread(fd, u.old, off); err != nil {
			u.old = nil
		}
	}
	mu.Lock()
	logs[path] = append(logs[path], u)
	total++
	mu.Unlock()
}

func synced(path string) {
	mu.Lock()
	delete(logs, path)
	mu.Unlock()
}

// crash applies every log newest first: each file goes back to its last sync.
func crash() int {
	mu.Lock()
	defer mu.Unlock()
	dropped := 0
	for path, log := range logs {
		fd, err := syscall.Open(path, syscall.O_WRONLY, 0)
		if err != nil {
			continue
		}
		for i := len(log) - 1; i >= 0; i-- {
			u := log[i]
			if len(u.old) > 0 {
				syscall.Pwrite(fd, u.old, u.off)
			}
			syscall.Ftruncate(fd, u.size)
			dropped++
		}
		syscall.Fsync(fd)
		syscall.Close(fd)
	}
	logs = map[string][]undo{}
	return dropped
}

// node is a loopback node whose open files keep their unsynced writes apart.
type node struct {
	fs.LoopbackNode
}

func (n *node) backing() string {
	return filepath.Join(n.RootData.Path, n.Path(n.Root()))
}

func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	fh, fl, errno := n.LoopbackNode.Open(ctx, flags)
	if errno != 0 {
		return nil, 0, errno
	}
	return &file{inner: fh, path: n.backing()}, fl, 0
}

func (n *node) Create(ctx context.Context, name string, flags uint32, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	ch, fh, fl, errno := n.LoopbackNode.Create(ctx, name, flags, mode, out)
	if errno != 0 {
		return nil, nil, 0, errno
	}
	return ch, &file{inner: fh, path: filepath.Join(n.backing(), name)}, fl, 0
}

func (n *node) Setattr(ctx context.Context, f fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if size, ok := in.GetSize(); ok {
		path := n.backing()
		if fd, err := syscall.Open(path, syscall.O_RDONLY, 0); err == nil {
			var st syscall.Stat_t
			if syscall.Fstat(fd, &st) == nil && int64(size) < st.Size {
				remember(path, fd, int64(size), st.Size-int64(size))
			} else {
				remember(path, fd, int64(size), 0)
			}
			syscall.Close(fd)
		}
	}
	if w, ok := f.(*file); ok {
		f = w.inner
	}
	return n.LoopbackNode.Setattr(ctx, f, in, out)
}

// file delegates to the loopback file, keeping what each write replaced.
type file struct {
	inner fs.FileHandle
	path  string
}

func (f *file) fd() int {
	fd, _ := f.inner.(fs.FilePassthroughFder).PassthroughFd()
	return fd
}

func (f *file) Read(ctx context.Context, dest []byte, off int64) (fuse.ReadResult, syscall.Errno) {
	return f.inner.(fs.FileReader).Read(ctx, dest, off)
}

func (f *file) Write(ctx context.Context, data []byte, off int64) (uint32, syscall.Errno) {
	remember(f.path, f.fd(), off, int64(len(data)))
	return f.inner.(fs.FileWriter).Write(ctx, data, off)
}

func (f *file) Fsync(ctx context.Context, flags uint32) syscall.Errno {
	errno := f.inner.(fs.FileFsyncer).Fsync(ctx, flags)
	if errno == 0 {
		synced(f.path)
	}
	return errno
}

func (f *file) Flush(ctx context.Context) syscall.Errno {
	return f.inner.(fs.FileFlusher).Flush(ctx)
}

func (f *file) Release(ctx context.Context) syscall.Errno {
	return f.inner.(fs.FileReleaser).Release(ctx)
}

func (f *file) Getattr(ctx context.Context, out *fuse.AttrOut) syscall.Errno {
	return f.inner.(fs.FileGetattrer).Getattr(ctx, out)
}

func (f *file) Lseek(ctx context.Context, off uint64, whence uint32) (uint64, syscall.Errno) {
	return f.inner.(fs.FileLseeker).Lseek(ctx, off, whence)
}

func (f *file) Getlk(ctx context.Context, owner uint64, lk *fuse.FileLock, flags uint32, out *fuse.FileLock) syscall.Errno {
	return f.inner.(fs.FileGetlker).Getlk(ctx, owner, lk, flags, out)
}

func (f *file) Setlk(ctx context.Context, owner uint64, lk *fuse.FileLock, flags uint32) syscall.Errno {
	return f.inner.(fs.FileSetlker).Setlk(ctx, owner, lk, flags)
}

func (f *file) Setlkw(ctx context.Context, owner uint64, lk *fuse.FileLock, flags uint32) syscall.Errno {
	return f.inner.(fs.FileSetlkwer).Setlkw(ctx, owner, lk, flags)
}

func (f *file) Allocate(ctx context.Context, off uint64, size uint64, mode uint32) syscall.Errno {
	remember(f.path, f.fd(), int64(off), 0)
	return f.inner.(fs.FileAllocater).Allocate(ctx, off, size, mode)
}

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: lazyfs <backing dir> <mount point>")
		os.Exit(2)
	}
	backing, mountpoint := os.Args[1], os.Args[2]
	var st syscall.Stat_t
	if err := syscall.Stat(backing, &st); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	root := &fs.LoopbackRoot{Path: backing, Dev: uint64(st.Dev)}
	root.NewNode = func(r *fs.LoopbackRoot, _ *fs.Inode, _ string, _ *syscall.Stat_t) fs.InodeEmbedder {
		return &node{fs.LoopbackNode{RootData: r}}
	}
	root.RootNode = root.NewNode(root, nil, "", &st)
	server, err := fs.Mount(mountpoint, root.RootNode, &fs.Options{
		MountOptions: fuse.MountOptions{DirectMount: true, FsName: "lazyfs", Name: "lazyfs"},
	})
	if err != nil {
		fmt.Fprintln(os.Stderr, "mount:", err)
		os.Exit(1)
	}
	signals := make(chan os.Signal, 1)
	signal.Notify(signals, syscall.SIGUSR1, syscall.SIGTERM)
	fmt.Println("mounted")
	sig := <-signals
	if sig == syscall.SIGUSR1 {
		// Nothing more reaches the backing files: the cut comes before the unmount.
		fmt.Printf("crashed: %d unsynced writes dropped\n", crash())
	}
	server.Unmount()
}
