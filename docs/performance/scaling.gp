set terminal pngcairo noenhanced size 1500,520 font ',10'
set output 'docs/performance/scaling.png'
set multiplot layout 1,3 title "MoE layer (fwd+bwd) and router (route()) time as T, E, K grow\nAMD EPYC, 2 threads (parallel_for uses 2), LibTorch 1.13.0, OMP_WAIT_POLICY=PASSIVE, OPENBLAS_THREAD_TIMEOUT=16, OpenBLAS core Cooperlake (OPENBLAS_CORETYPE=unset, none)"
set logscale xy
set grid
set key top left
set ylabel 'ms (median)'
set offsets graph 0.05, graph 0.05
set xlabel 'T'
set title 'vs T'
plot 'docs/performance/scaling_T.dat' using 1:2 with linespoints lw 2 title 'layer ~ T^0.86', '' using 1:3 with linespoints lw 2 title 'route() ~ T^0.87'
set xlabel 'E'
set title 'vs E'
plot 'docs/performance/scaling_E.dat' using 1:2 with linespoints lw 2 title 'layer ~ E^0.26', '' using 1:3 with linespoints lw 2 title 'route() ~ E^0.41'
set xlabel 'K'
set title 'vs K'
plot 'docs/performance/scaling_K.dat' using 1:2 with linespoints lw 2 title 'layer ~ K^0.84', '' using 1:3 with linespoints lw 2 title 'route() ~ K^0.12'
unset multiplot
