#!/usr/bin/perl
# Usage: shipped-deps.pl DIR ROOT... -- FORBIDDEN...
# Reads every Android.bp under DIR, follows `rustlibs`, `static_libs` and `shared_libs` (also
# those of the modules named in `defaults`) from each ROOT, and fails naming the path if a
# FORBIDDEN module is reached. Top-level properties only (this project's files have none under
# `target:`), which is what a shipped module's dependencies look like here.
use strict;
use warnings;

my $dir = shift @ARGV;
my (@roots, @forbidden);
my $list = \@roots;
for (@ARGV) { if ($_ eq '--') { $list = \@forbidden; next } push @$list, $_ }
die "shipped-deps.pl: no roots or nothing forbidden\n" unless @roots && @forbidden;

my %deps;
# Every Android.bp under $dir (perl-base only: no File::Find).
sub bp_files {
    my ($d) = @_;
    opendir my $dh, $d or die "shipped-deps.pl: $d: $!\n";
    my @out;
    for my $e (sort readdir $dh) {
        next if $e eq '.' || $e eq '..';
        my $p = "$d/$e";
        if (-d $p && !-l $p) { push @out, bp_files($p) }
        elsif ($e eq 'Android.bp') { push @out, $p }
    }
    return @out;
}

for my $file (bp_files($dir)) {
    open my $fh, '<', $file or die "shipped-deps.pl: $file: $!\n";
    local $/;
    my $text = <$fh>;
    $text =~ s{^\s*//.*$}{}mg;
    while ($text =~ /^\w+ \{\n(.*?)^\}/msg) {
        my $body = $1;
        my ($name) = $body =~ /^    name: "([^"]+)"/m or next;
        my @d;
        for my $prop (qw(rustlibs static_libs shared_libs defaults)) {
            while ($body =~ /^    $prop: \[(.*?)\]/msg) { push @d, $1 =~ /"([^"]+)"/g }
        }
        push @{ $deps{$name} }, @d;
    }
}

my %bad = map { $_ => 1 } @forbidden;
my $fail = 0;
for my $root (@roots) {
    die "shipped-deps.pl: no module $root\n" unless exists $deps{$root};
    my %seen = ($root => $root);
    my @queue = ($root);
    while (defined(my $m = shift @queue)) {
        for my $d (@{ $deps{$m} // [] }) {
            next if exists $seen{$d};
            $seen{$d} = "$seen{$m} -> $d";
            if ($bad{$d}) { print STDERR "shipped-deps: $seen{$d}\n"; $fail = 1; next }
            push @queue, $d;
        }
    }
}
exit $fail;
